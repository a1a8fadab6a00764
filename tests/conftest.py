"""Test-wide setup.

Without a GPU, Triton kernels run under the CPU interpreter. ``TRITON_INTERPRET`` is read when a
kernel is decorated, so it must be set before any kernel module is imported: here, first.
"""

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads cost more in synchronisation than they save (10x on a
    loaded 2-core machine), so such tests run single-threaded and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Settings of the end-to-end build used by tests/test_build.py and tests/test_runtime.py: tiny
# enough for a couple of minutes on 2 CPU cores, real enough to exercise every step.
TINY_BUILD_ARGS = [
    "--text-prior=learned",
    "--epochs=1",
    "--preset=cpu",
    "--device=cpu",
    "--no-progress",
    "--set=logical.image_size=64",
    "--set=structural.image_size=64",
    "--set=structural.feature_dim=336",  # the preset's three levels fit: 3 x 112 channels
    "--set=train.batch_size=4",
]


@pytest.fixture(scope="session")
def tiny_build_args() -> list[str]:
    return list(TINY_BUILD_ARGS)


@pytest.fixture(scope="session")
def tiny_loco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic pushpins category (8 train, 4 validation, 3 per test type)."""
    from engine.data.synthetic import generate_category

    root = tmp_path_factory.mktemp("loco")
    generate_category(
        root,
        "pushpins",
        seed=1,
        size=(170, 100),
        n_train=8,
        n_validation=4,
        n_test_good=3,
        n_logical=3,
        n_structural=3,
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, tiny_loco: Path) -> dict[str, Path]:
    """``python -m engine.build`` on :func:`tiny_loco`: the artifact and the saved fused maps."""
    from engine.build import main

    work = tmp_path_factory.mktemp("build")
    artifact, maps = work / "artifact", work / "maps"
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={artifact}"]
    argv += [f"--save-maps={maps}", *TINY_BUILD_ARGS]
    assert main(argv) == 0
    return {"artifact": artifact, "maps": maps, "data": tiny_loco}


def bilinear_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W) bilinear resize in float64, written out in numpy.

    Same rule as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    without antialiasing: output pixel ``i`` samples source coordinate ``(i + 0.5) * h / H - 0.5``,
    clamped at 0, between rows ``floor`` and ``floor + 1`` (the last row repeats at the edge).
    Bilinear is separable, so it is done one axis at a time.
    """
    out = np.asarray(image, dtype=np.float64)
    for axis, n_out in enumerate(size):
        n_in = out.shape[axis]
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        shape = [1, 1]
        shape[axis] = n_out
        frac = (src - low).reshape(shape)
        out = (1.0 - frac) * np.take(out, low, axis=axis) + frac * np.take(out, high, axis=axis)
    return out


def reference_fused_map(
    maps: dict[str, np.ndarray] | Any,
    manifest: dict,
    size: tuple[int, int],
    weights: dict[str, float] | None = None,
    placement: np.ndarray | None = None,
    absence: np.ndarray | None = None,
) -> np.ndarray:
    """The fused (H, W) map recomputed with numpy/scipy only, in float64.

    ``maps``: (S, S) raw branch maps at model resolution by branch name, or a Runtime Result
    (its ``logical_map`` / ``structural_map`` / ``positional_map`` / ``composition_map``); ``manifest``: the artifact's
    manifest, whose ``calibration`` (``mean`` / ``std`` per branch), ``fusion_weights`` (unless
    ``weights`` overrides them) and ``config.fusion.sigma`` (σ at a 256-px map, scaled to S) are
    used, and with ``config.fusion.merge == "max"`` its ``image_calibration``. The blur is
    ``scipy.ndimage.gaussian_filter`` with the engine kernel's rules
    (kernels/blur.py): ``mode="reflect"`` (half-sample symmetric), radius ``int(4 * sigma + 0.5)``.
    ``placement``: the composition model's (S, S) placement map (a model output, like the
    branch maps), needed where ``config.fusion.placement_power`` gates the composition evidence;
    ``absence``: its (S, S) absence map, needed where ``config.composition.absence_sigma`` is set
    (with ``merge == "max"`` the fused map is raised to ``fusion.absence_weight`` times it where
    it is above 0, cut at the map's maximum).
    """
    from scipy.ndimage import gaussian_filter

    maps = maps if isinstance(maps, dict) else _result_maps(maps)
    weights = manifest["fusion_weights"] if weights is None else weights
    shapes = {m.shape for m in maps.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"branch maps differ in shape or are not 2-D: {shapes}")
    side = next(iter(shapes))[0]

    def normalised(name: str) -> np.ndarray:
        stats = manifest["calibration"][name]
        return (maps[name].astype(np.float64) - stats["mean"]) / stats["std"]

    others = [n for n in maps if n != "composition" and weights.get(n, 0.0)]
    merged = np.zeros((side, side), dtype=np.float64)
    for name in others:
        merged += weights[name] * normalised(name)
    sigma = manifest["config"]["fusion"]["sigma"] * side / 256

    def blur(image: np.ndarray) -> np.ndarray:
        return gaussian_filter(image, sigma=sigma, mode="reflect", truncate=4.0)

    def gated(evidence: np.ndarray, base: np.ndarray) -> np.ndarray:
        # the image's composition score above the validation mean, placed on the other
        # branches' map rescaled to [0, 1] and raised to the gate power
        gate = (base - base.min()) / max(base.max() - base.min(), 1e-12)
        return np.maximum(evidence, 0.0) * gate ** composition["gate_power"]

    composition = manifest["config"].get("composition", {})
    if manifest["config"]["fusion"].get("merge", "sum") == "max":
        fused = _max_merged(maps, manifest, weights, normalised, blur, placement)
        if composition.get("absence_sigma") is not None:
            if absence is None:
                raise ValueError("composition.absence_sigma is set: pass the absence map")
            mark = manifest["config"]["fusion"]["absence_weight"] * absence.astype(np.float64)
            fused = np.where(absence > 0, np.maximum(fused, np.minimum(mark, fused.max())), fused)
        return bilinear_resize(fused, size)
    mode = composition.get("fused_map") if others else "image"
    if "composition" not in maps or not weights.get("composition", 0.0):
        return bilinear_resize(blur(merged), size)
    evidence = normalised("composition")
    if mode == "gated_after_blur":
        fused = blur(merged)
        return bilinear_resize(fused + weights["composition"] * gated(evidence, fused), size)
    if mode == "gated":
        evidence = gated(evidence, merged)
    return bilinear_resize(blur(merged + weights["composition"] * evidence), size)


def _max_merged(
    maps: dict, manifest: dict, weights: dict, normalised, blur, placement: np.ndarray | None
) -> np.ndarray:
    """The ``fusion.merge="max"`` map at model size: each branch standardised by its pixel
    statistics, blurred (not the composition map, constant per image), standardised by its
    ``image_calibration``, its part above 0 weighted and the part below scaled by its
    ``background_scales`` (1 without); the pointwise maximum of the map branches (with
    ``positional_role="shape"`` the positional map cut at the image's score without it), its
    peak raised to the composition value where that is larger, spread by the gate (1 everywhere
    on a flat map); with ``placement_power`` the gate is the larger of that and the placement
    rescaled to [0, 1] (0 on a flat map) to that power."""
    scaled = {}
    backgrounds = manifest.get("background_scales", {})
    for name in maps:
        if not weights.get(name, 0.0):
            continue
        image = manifest["image_calibration"][name]
        values = normalised(name) if name == "composition" else blur(normalised(name))
        z = (values - image["mean"]) / image["std"]
        scaled[name] = np.where(z > 0, weights[name] * z, backgrounds.get(name, 1.0) * z)
    evidence = scaled.pop("composition", None)
    shaping = None
    if manifest["config"]["fusion"].get("positional_role", "score") == "shape":
        shaping = scaled.pop("positional", None)
    fused = np.max(np.stack(list(scaled.values())), axis=0)
    if shaping is not None:
        score = fused.max() if evidence is None else max(fused.max(), evidence.max())
        fused = np.maximum(fused, np.minimum(shaping, score))
    if evidence is None:
        return fused
    composition = manifest["config"]["composition"]
    if composition["fused_map"] == "image":
        return np.maximum(fused, evidence)
    gate = _rescaled(fused, flat=1.0) ** composition["gate_power"]
    power = manifest["config"]["fusion"].get("placement_power")
    if power is not None:
        if placement is None:
            raise ValueError("fusion.placement_power is set: pass the composition placement map")
        gate = np.maximum(gate, _rescaled(placement, flat=0.0) ** power)
    return fused + np.maximum(evidence - fused.max(), 0.0) * gate


def _rescaled(values: np.ndarray, flat: float) -> np.ndarray:
    """``values`` rescaled to [0, 1] in float64, ``flat`` everywhere on a constant map."""
    values = values.astype(np.float64)
    low, span = values.min(), values.max() - values.min()
    return (values - low) / span if span > 0 else np.full_like(values, flat)


def _result_maps(result: Any) -> dict[str, np.ndarray]:
    """A Runtime Result's branch maps by branch name (the optional branches when present)."""
    maps = {"logical": result.logical_map, "structural": result.structural_map}
    for name in ("positional", "composition"):
        if getattr(result, f"{name}_map") is not None:
            maps[name] = getattr(result, f"{name}_map")
    return maps


@pytest.fixture(scope="session")
def fused_reference():
    """:func:`reference_fused_map`, for tests that check engine maps independently."""
    return reference_fused_map


def _runtime_model_maps(rt: Any, image: np.ndarray) -> dict[str, np.ndarray | None]:
    """The composition model's (S, S) placement and absence maps of one RGB ``image`` under
    Runtime ``rt`` (None where the model has none): the model outputs
    :func:`reference_fused_map` takes beside the branch maps, as its keyword arguments."""
    with torch.no_grad():
        maps = rt.detector(torch.from_numpy(image)[None])
    extra = {"placement": maps.placement, "absence": maps.absence}
    return {k: None if m is None else m[0].double().numpy() for k, m in extra.items()}


@pytest.fixture(scope="session")
def runtime_model_maps():
    """:func:`_runtime_model_maps`."""
    return _runtime_model_maps
