"""The deployed engine's numbers recomputed without its code: fused maps, validation scores and
the threshold, from the artifact's branch maps, stored calibration and config (numpy/scipy).

The end-to-end tests in test_runtime.py compare the Runtime with the build, which run the same
``Detector`` / ``fuse_maps`` code; these tests would catch a bug shared by both sides (e.g. the
branch statistics swapped in the fusion call, or the threshold taken at the wrong rank).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.calibrate import MERGES
from engine.config import cpu_build_preset
from engine.runtime import Result, Runtime

# The engine fuses and blurs in float32, the reference in float64. On the tiny build (fused
# values within +-40, the gated composition term raised to the 8th power) they differ by up to
# 1.5e-6 relative without the positional memory and 1.7e-5 with it (its distances lie far from
# zero against their validation spread, so float32 standardisation keeps fewer digits);
# swapping the branch statistics moves the map by whole units.
FUSED_ATOL = 3e-5
FUSED_RTOL = 4e-5
# Scores of the same batch as the build's calibration: only float32 rounding may differ, and
# reductions summed in another order (threads) differ by a few ulps of the score's magnitude
# (6.756572 vs 6.756562 seen on a loaded 2-core host: 1.5e-6 relative).
SCORE_ATOL = 1e-5
SCORE_RTOL = 1e-5


def read_image(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def other_merge() -> str:
    """The fusion merge the cpu preset does not use."""
    return next(m for m in MERGES if m != cpu_build_preset().fusion.merge)


# Each variant of the tiny build: its --set overrides (the preset's own build is tiny_build).
VARIANTS = {
    "other merge": [f"--set=fusion.merge={other_merge()}"],
    # max merge with other weights (scaling the evidence only) and the backgrounds equalised
    "equalised backgrounds": [
        "--set=fusion.merge=max",
        "--set=fusion.background_quantile=0.95",
        "--set=fusion.background_target=lowest",
        "--set=fusion.positional_weight=0.5",
        "--set=fusion.logical_weight=1.5",
    ],
}


@pytest.fixture(scope="module", params=["preset merge", *VARIANTS])
def build(
    request: pytest.FixtureRequest,
    tiny_build: dict[str, Path],
    tiny_build_args: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """The tiny build, and the same build with the other ``fusion.merge`` or other max-merge
    settings."""
    if request.param == "preset merge":
        return tiny_build
    from engine.build import main

    artifact = tmp_path_factory.mktemp(request.param.replace(" ", "-")) / "artifact"
    argv = ["--category=pushpins", f"--data-root={tiny_build['data']}", f"--out={artifact}"]
    assert main([*argv, *tiny_build_args, *VARIANTS[request.param]]) == 0
    return {"artifact": artifact, "data": tiny_build["data"]}


@pytest.fixture(scope="module")
def rt(build: dict[str, Path]) -> Runtime:
    # eager: the backend the build scored with (``auto`` would pick onnx on CPU).
    return Runtime.load(build["artifact"], device="cpu", backend="eager")


@pytest.fixture(scope="module")
def manifest(build: dict[str, Path]) -> dict:
    return json.loads((build["artifact"] / "manifest.json").read_text())


@pytest.mark.parametrize("size", [(100, 170), (64, 64), (37, 50), (200, 41)])
def test_reference_resize_is_torch_bilinear(
    fused_reference: Callable, size: tuple[int, int]
) -> None:
    """The reference's numpy resize follows torch's align_corners=False rule, up and down."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    branch = rng.normal(size=(64, 64))
    unit = {"mean": 0.0, "std": 1.0}
    manifest = {
        "calibration": {"logical": unit, "structural": unit},
        "fusion_weights": {"logical": 1.0, "structural": 0.0},
        "config": {"fusion": {"sigma": 8.0}},  # 2 px at 64 px
    }
    got = fused_reference({"logical": branch, "structural": branch}, manifest, size)
    blurred = torch.from_numpy(gaussian_filter(branch, sigma=2.0, mode="reflect"))
    want = torch.nn.functional.interpolate(
        blurred[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0]
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_fused_map_equals_the_formula(
    rt: Runtime,
    manifest: dict,
    build: dict[str, Path],
    fused_reference: Callable,
    runtime_model_maps: Callable,
) -> None:
    images = sorted((build["data"] / "pushpins" / "test").rglob("*.png"))
    assert len(images) == 9
    for path in images:
        image = read_image(path)
        result = rt(image, color="rgb")
        assert isinstance(result, Result)
        want = fused_reference(result, manifest, image.shape[:2], **runtime_model_maps(rt, image))
        np.testing.assert_allclose(
            result.anomaly_map, want, rtol=FUSED_RTOL, atol=FUSED_ATOL, err_msg=path
        )
        assert result.score == pytest.approx(want.max(), rel=FUSED_RTOL, abs=FUSED_ATOL)


@pytest.mark.slow
def test_composition_after_the_blur_equals_the_formula(
    rt: Runtime, manifest: dict, build: dict[str, Path], fused_reference: Callable
) -> None:
    if rt.detector.fusion.merge != "sum":
        pytest.skip("gated_after_blur is an option of merge='sum'; the other build runs it")
    composition, fusion = rt.detector.composition, rt.detector.fusion
    assert composition is not None and composition.config.fused_map == "gated"
    assert fusion.gate_power == composition.config.gate_power and not fusion.gate_after_blur
    fusion.gate_after_blur = True  # what a detector built with "gated_after_blur" holds
    after = copy.deepcopy(manifest)
    after["config"]["composition"]["fused_map"] = "gated_after_blur"
    changed = []
    try:
        for path in sorted((build["data"] / "pushpins" / "test").rglob("*.png")):
            image = read_image(path)
            result = rt(image, color="rgb")
            want = fused_reference(result, after, image.shape[:2])
            np.testing.assert_allclose(
                result.anomaly_map, want, rtol=FUSED_RTOL, atol=FUSED_ATOL, err_msg=path
            )
            before = fused_reference(result, manifest, image.shape[:2])
            changed.append(not np.allclose(want, before, rtol=FUSED_RTOL, atol=FUSED_ATOL))
    finally:
        fusion.gate_after_blur = False
    assert any(changed)  # the two modes differ wherever the composition evidence is positive


@pytest.mark.slow
def test_runtime_reproduces_validation_scores_and_threshold(
    rt: Runtime, manifest: dict, build: dict[str, Path]
) -> None:
    paths = sorted((build["data"] / "pushpins" / "validation" / "good").glob("*.png"))
    # One batch, as the build calibrated them (it scores 8 images per batch).
    results = rt([read_image(p) for p in paths], color="rgb")
    scores = np.array([r.score for r in results])
    stored = np.array(manifest["validation_scores"], dtype=np.float64)
    assert stored.shape == (len(paths),) == (4,)
    np.testing.assert_allclose(scores, stored, rtol=SCORE_RTOL, atol=SCORE_ATOL)

    # The documented rule: the (n - floor(rate * n))-th smallest validation score.
    rate = manifest["config"]["fusion"]["target_false_alarm_rate"]
    n = stored.size
    expected = np.sort(stored)[n - math.floor(rate * n) - 1]
    assert manifest["threshold"] == expected
    assert rt.threshold == expected
    assert [r.is_anomalous for r in results] == [bool(s > expected) for s in scores]


def validation_maps(rt: Runtime, manifest: dict, build: dict[str, Path]) -> dict[str, list]:
    """Each branch's validation maps standardised by its pixel statistics and, but for the
    composition map (constant per image), blurred, in numpy: what its image score is the
    maximum of."""
    from scipy.ndimage import gaussian_filter

    paths = sorted((build["data"] / "pushpins" / "validation" / "good").glob("*.png"))
    results = rt([read_image(p) for p in paths], color="rgb")
    sigma = manifest["config"]["fusion"]["sigma"] * results[0].logical_map.shape[0] / 256
    out: dict[str, list] = {}
    for branch, pixel in manifest["calibration"].items():
        out[branch] = []
        for result in results:
            values = getattr(result, f"{branch}_map").astype(np.float64) - pixel["mean"]
            values /= pixel["std"]
            if branch != "composition":
                values = gaussian_filter(values, sigma=sigma, mode="reflect", truncate=4.0)
            out[branch].append(values)
    return out


@pytest.mark.slow
def test_image_calibration_is_the_validation_image_scores(
    rt: Runtime, manifest: dict, build: dict[str, Path]
) -> None:
    """merge='max': each branch's stored image statistics are the population mean and std of
    the maxima of its standardised, blurred validation maps, recomputed here in numpy (with
    ``image_scale="pooled"``, the logical and structural std pooled; with
    ``composition_scale="robust"``, the composition branch's median and 1.4826 x MAD)."""
    if manifest["config"]["fusion"]["merge"] != "max":
        assert "image_calibration" not in manifest
        pytest.skip("merge='sum' stores no image statistics; the other build has them")
    fusion = manifest["config"]["fusion"]
    want = {}
    for branch, maps in validation_maps(rt, manifest, build).items():
        scores = [values.max() for values in maps]
        want[branch] = [np.mean(scores), np.std(scores)]
        if branch == "composition" and fusion.get("composition_scale") == "robust":
            median = np.median(scores)
            want[branch] = [median, 1.4826 * np.median(np.abs(np.asarray(scores) - median))]
    if fusion.get("image_scale", "branch") == "pooled":
        pooled = np.sqrt((want["logical"][1] ** 2 + want["structural"][1] ** 2) / 2)
        want["logical"][1] = want["structural"][1] = pooled
    for branch, stored in manifest["image_calibration"].items():
        assert stored["mean"] == pytest.approx(want[branch][0], rel=1e-5, abs=1e-5), branch
        assert stored["std"] == pytest.approx(want[branch][1], rel=1e-4, abs=1e-5), branch


@pytest.mark.slow
def test_background_scales_are_the_validation_quantiles(
    rt: Runtime, manifest: dict, build: dict[str, Path]
) -> None:
    """fusion.background_quantile: each map branch's stored scale moves the quantile of its
    validation pixels (in image units, weighted) to the mean or the lowest of those below 0,
    recomputed here; a branch whose quantile is not below 0 keeps 1."""
    quantile = manifest["config"]["fusion"].get("background_quantile")
    if quantile is None:
        assert "background_scales" not in manifest
        pytest.skip("no background_quantile in this build; the equalised build has one")
    tails = {}
    for branch, maps in validation_maps(rt, manifest, build).items():
        if branch == "composition":
            continue
        image = manifest["image_calibration"][branch]
        z = (np.stack(maps) - image["mean"]) / image["std"]
        z = np.where(z > 0, manifest["fusion_weights"][branch] * z, z)
        tails[branch] = np.quantile(z, quantile)
    below = {b: p for b, p in tails.items() if p < 0}  # a tail above 0 is left alone
    assert len(below) >= 2, tails
    lowest = manifest["config"]["fusion"]["background_target"] == "lowest"
    target = min(below.values()) if lowest else np.mean(list(below.values()))
    stored = manifest["background_scales"]
    assert set(stored) == set(manifest["calibration"])
    for branch, scale in stored.items():
        want = target / below[branch] if branch in below else 1.0
        assert scale == pytest.approx(want, rel=1e-4), branch
    assert len(set(np.round(list(stored.values()), 6))) > 1  # the scales really differ
