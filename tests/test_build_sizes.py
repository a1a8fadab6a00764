"""An end-to-end build whose branches take different input sizes (logical 64 px, structural
96 px, as the default presets do: 128 / 256 px; the composition branch its own 80 px pass),
while the shared tiny build uses one size; with every optional branch (a positional memory on
the structural features too, capped at fewer training images than the category has)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.build import main
from engine.metrics import read_map
from engine.runtime import Result, Runtime

pytestmark = pytest.mark.slow

LOGICAL_SIZE, STRUCTURAL_SIZE, COMPOSITION_SIZE = 64, 96, 80
POSITIONAL_ROWS = 5  # of the 8 training images
# Runtime (1 image per batch) and build (8 per batch): float32 rounding noise only.
MAP_ATOL = 1e-4
MAP_RTOL = 1e-5  # maps reach tens of units: rounding noise scales with them


@pytest.fixture(scope="module")
def sized_build(
    tmp_path_factory: pytest.TempPathFactory, tiny_loco: Path, tiny_build_args: list[str]
) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("sized_build")
    artifact, maps = work / "artifact", work / "maps"
    args = [a for a in tiny_build_args if not a.startswith("--set=structural.image_size=")]
    args += [f"--set=logical.image_size={LOGICAL_SIZE}"]
    args += [f"--set=structural.image_size={STRUCTURAL_SIZE}"]
    args += [f"--set=composition.image_size={COMPOSITION_SIZE}"]
    args += ["--set=positional.enabled=true", f"--set=positional.max_images={POSITIONAL_ROWS}"]
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={artifact}"]
    assert main([*argv, f"--save-maps={maps}", *args]) == 0
    return {"artifact": artifact, "maps": maps, "data": tiny_loco}


@pytest.fixture(scope="module")
def rt(sized_build: dict[str, Path]) -> Runtime:
    return Runtime.load(sized_build["artifact"], device="cpu", backend="eager")


def test_manifest_records_every_size(sized_build: dict[str, Path]) -> None:
    manifest = json.loads((sized_build["artifact"] / "manifest.json").read_text())
    config = manifest["config"]
    assert config["logical"]["image_size"] == LOGICAL_SIZE
    assert config["structural"]["image_size"] == STRUCTURAL_SIZE
    assert config["composition"]["image_size"] == COMPOSITION_SIZE
    # EfficientNet-Lite0's finest level (layer2) has stride 8.
    assert manifest["composition_grid"] == [COMPOSITION_SIZE // 8] * 2
    assert manifest["positional_memory"] == {
        "grid": [STRUCTURAL_SIZE // 8] * 2,
        "images": POSITIONAL_ROWS,
    }
    assert config["positional"]["max_images"] == POSITIONAL_ROWS
    assert set(manifest["calibration"]) == {"logical", "structural", "positional", "composition"}


def test_each_branch_receives_its_own_input_size(rt: Runtime, sized_build: dict[str, Path]) -> None:
    seen: dict[str, list[tuple[int, ...]]] = {"structural": [], "logical": []}

    def spy(name: str) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen[name].append(tuple(inputs[0].shape))

        return hook

    handles = [
        rt.detector.structural.patch_features.register_forward_pre_hook(spy("structural")),
        rt.detector.logical.encoder.register_forward_pre_hook(spy("logical")),
    ]
    try:
        path = sized_build["data"] / "pushpins" / "test" / "good" / "000.png"
        result = rt(np.array(Image.open(path).convert("RGB")), color="rgb")
    finally:
        for handle in handles:
            handle.remove()
    # The memory bank's pass, then the composition branch's own.
    assert seen == {
        "structural": [(1, 3, side, side) for side in (STRUCTURAL_SIZE, COMPOSITION_SIZE)],
        "logical": [(1, 3, LOGICAL_SIZE, LOGICAL_SIZE)],
    }
    assert isinstance(result, Result)
    # Every branch map comes out at the logical (fused map) resolution.
    for name in ("logical", "structural", "positional", "composition"):
        assert getattr(result, f"{name}_map").shape == (LOGICAL_SIZE, LOGICAL_SIZE), name


def test_runtime_maps_equal_the_saved_maps_and_the_formula(
    rt: Runtime,
    sized_build: dict[str, Path],
    fused_reference: Callable,
    runtime_model_maps: Callable,
) -> None:
    manifest = json.loads((sized_build["artifact"] / "manifest.json").read_text())
    test_root = sized_build["data"] / "pushpins" / "test"
    images = sorted(test_root.rglob("*.png"))
    assert len(images) == 9
    for path in images:
        image = np.array(Image.open(path).convert("RGB"))
        result = rt(image, color="rgb")
        assert isinstance(result, Result)
        saved = read_map(
            sized_build["maps"]
            / "pushpins"
            / path.relative_to(test_root.parent).with_suffix(".tiff")
        )
        np.testing.assert_allclose(
            result.anomaly_map, saved, rtol=MAP_RTOL, atol=MAP_ATOL, err_msg=path
        )
        want = fused_reference(result, manifest, image.shape[:2], **runtime_model_maps(rt, image))
        np.testing.assert_allclose(
            result.anomaly_map, want, rtol=MAP_RTOL, atol=MAP_ATOL, err_msg=path
        )
