"""An artifact whose max-merge fusion places the composition evidence by the composition
model's placement map (``fusion.placement_power``): saved, loaded and applied; the image
scores are those of the peak gate alone; artifacts from before the option load without it."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.artifact import load_artifact, read_manifest
from engine.calibrate import PLACEMENT, BranchStats
from engine.config import BuildConfig, cpu_build_preset, paper_preset
from engine.detector import Detector

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = pytest.mark.usefixtures("one_thread")

# the composition branch's validation scores far below its test scores: its evidence is
# above the other branches' peak on every frame, so the gate decides where the map rises
IMAGE_STATS = {
    "logical": BranchStats(1.25, 0.5),
    "structural": BranchStats(2.0, 0.75),
    "composition": BranchStats(-20.0, 0.5),
}


def max_merged(detector: Detector, config: BuildConfig, power: float | None) -> Detector:
    fusion = replace(config.fusion, merge="max", placement_power=power)
    return Detector(
        detector.logical,
        detector.structural,
        fusion,
        detector.stats,
        structural_size=tiny["SIZE"],
        composition=detector.composition,
        image_stats=IMAGE_STATS,
    )


@pytest.fixture(scope="module")
def built():
    detector, config = tiny["composed"]()
    config = replace(config, fusion=replace(config.fusion, merge="max", placement_power=4.0))
    return max_merged(detector, config, 4.0), max_merged(detector, config, None), config


def test_the_placement_round_trips_and_spreads_only_the_map(built, tmp_path: Path) -> None:
    placed, peak_only, config = built
    art = tiny["save"](tmp_path / "art", placed, config)
    assert read_manifest(art)["config"]["fusion"]["placement_power"] == 4.0
    loaded, _ = load_artifact(art)
    assert loaded.fusion.placement_power == 4.0
    frames = tiny["frames"]()
    with torch.no_grad():
        got, want, plain = loaded(frames), placed(frames), peak_only(frames)
    assert got.fused is not None and want.fused is not None and plain.fused is not None
    assert (got.fused - want.fused).abs().max() == 0
    assert got.placement is not None and got.placement.shape == got.fused.shape
    assert float(got.placement.min()) >= 0 and float(got.placement.amax((1, 2)).min()) > 0.99
    torch.testing.assert_close(got.fused.amax((1, 2)), plain.fused.amax((1, 2)))
    # the tiny model's placement is flat (it places nothing); another one moves the evidence
    inputs = got.fusion_inputs()
    moved = inputs[PLACEMENT].roll(5, dims=-1) * torch.linspace(0, 1, 32)
    with torch.no_grad():
        elsewhere = loaded.fuse({**inputs, PLACEMENT: moved})
    assert (elsewhere > got.fused + 1).any()
    torch.testing.assert_close(elsewhere.amax((1, 2)), got.fused.amax((1, 2)))
    tiny["check_loads"](art)


def test_the_cpu_preset_places_and_a_manifest_from_before_the_option_does_not() -> None:
    """ablation 50 made power 16 the cpu preset's; the paper preset keeps the peak gate alone,
    and so does an artifact built before the option existed."""
    assert paper_preset().fusion.component_placement is None
    values = cpu_build_preset().to_dict()
    assert values["fusion"].pop("placement_power") == 16.0
    assert BuildConfig.from_dict(values).fusion.placement_power is None
