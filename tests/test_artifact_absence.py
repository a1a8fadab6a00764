"""An artifact whose composition model maps where parts are missing
(``composition.absence_sigma``) and whose max-merge fusion marks that map: saved, loaded and
applied; the image scores do not move; artifacts from before the option load without it."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.artifact import load_artifact, read_manifest
from engine.calibrate import ABSENCE, BranchStats
from engine.config import BuildConfig, cpu_build_preset, paper_preset

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_STATS = {
    "logical": BranchStats(1.25, 0.5),
    "structural": BranchStats(2.0, 0.75),
    "composition": BranchStats(1.0, 0.5),
}


@pytest.fixture(scope="module")
def built():
    detector, config = tiny["composed"](absence_sigma=0.25)
    config = replace(config, fusion=replace(config.fusion, merge="max"))
    detector = type(detector)(
        detector.logical,
        detector.structural,
        config.fusion,
        detector.stats,
        structural_size=tiny["SIZE"],
        composition=detector.composition,
        image_stats=IMAGE_STATS,
    )
    return detector, config


def test_the_absence_map_round_trips_and_marks_without_moving_scores(built, tmp_path: Path):
    detector, config = built
    assert detector.fusion.absence_weight == 1.0
    art = tiny["save"](tmp_path / "art", detector, config)
    assert read_manifest(art)["config"]["composition"]["absence_sigma"] == 0.25
    loaded, _ = load_artifact(art)
    assert loaded.composition is not None and loaded.composition.absence is not None
    for name, value in detector.composition.absence.state_dict().items():
        assert torch.equal(loaded.composition.absence.state_dict()[name], value)
    frames = tiny["frames"]()
    with torch.no_grad():
        got, want = loaded(frames), detector(frames)
    assert got.fused is not None and want.fused is not None and got.absence is not None
    assert torch.equal(got.fused, want.fused)
    assert got.absence.shape == got.fused.shape
    inputs = got.fusion_inputs()
    with torch.no_grad():
        unmarked = loaded.fuse({**inputs, ABSENCE: torch.full_like(got.absence, -1.0)})
        marked = loaded.fuse({**inputs, ABSENCE: torch.full_like(got.absence, 50.0)})
    torch.testing.assert_close(unmarked.amax((1, 2)), got.fused.amax((1, 2)))
    torch.testing.assert_close(marked.amax((1, 2)), got.fused.amax((1, 2)))
    assert (marked > unmarked).any()
    tiny["check_loads"](art)


def test_the_cpu_preset_maps_absence_and_manifests_from_before_the_option_do_not() -> None:
    """ablation 65 made sigma 1/16 the cpu preset's; the paper preset has no composition branch
    and an artifact built before the option has no absence map."""
    assert cpu_build_preset().composition.absence_sigma == 1 / 16
    assert paper_preset().composition.absence_sigma is None
    values = BuildConfig().to_dict()
    del values["composition"]["absence_sigma"], values["composition"]["absence_std_floor"]
    del values["fusion"]["absence_weight"]
    config = BuildConfig.from_dict(values)
    assert config.composition.absence_sigma is None and config.fusion.absence_weight == 1.0
