"""An artifact whose max-merge fusion equalises the branches' backgrounds
(``fusion.background_quantile``): the scales saved, loaded and applied, refused when malformed;
artifacts from before the option load without it."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import pytest

from engine.artifact import ArtifactError, load_artifact, read_manifest
from engine.calibrate import BranchStats
from engine.config import BuildConfig, cpu_build_preset
from engine.detector import Detector

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_STATS = {"logical": BranchStats(1.25, 0.5), "structural": BranchStats(2.0, 0.75)}
SCALES = {"logical": 0.625, "structural": 1.75}


@pytest.fixture(scope="module")
def built():
    """The tiny detector with ``merge="max"``, ``background_quantile=0.99`` and SCALES."""
    detector, config = tiny["tiny_detector"](0)
    fusion = replace(config.fusion, merge="max", background_quantile=0.99)
    config = replace(config, fusion=fusion)
    equalised = Detector(
        detector.logical,
        detector.structural,
        fusion,
        detector.stats,
        structural_size=tiny["SIZE"],
        image_stats=IMAGE_STATS,
        backgrounds=SCALES,
    )
    return equalised, config


def test_the_scales_round_trip_and_shape_the_map(built, tmp_path: Path) -> None:
    art = tiny["save"](tmp_path / "art", *built)
    assert read_manifest(art)["background_scales"] == SCALES
    detector, _ = load_artifact(art)
    assert detector.fusion.background_quantile == 0.99
    assert detector.fusion.backgrounds == SCALES
    frames = tiny["frames"]()
    loaded = detector(frames)
    fused = built[0](frames)
    assert (loaded.fused - fused.fused).abs().max() == 0
    tiny["check_loads"](art)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("background_scales"), "background_scales is missing"),
        (
            lambda m: m["background_scales"].pop("structural"),
            "background_scales must be an object with exactly the branches",
        ),
        (
            lambda m: m["background_scales"].update(logical=-1.0),
            "background_scales.logical must be a finite number in",
        ),
        (
            lambda m: m["background_scales"].update(logical="wide"),
            "background_scales.logical must be a finite number",
        ),
    ],
)
def test_malformed_scales_are_refused(built, tmp_path: Path, edit, message) -> None:
    art = tiny["save"](tmp_path / "art", *built)
    tiny["edit_manifest"](art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


def test_a_manifest_from_before_the_option_fuses_without_it() -> None:
    values = cpu_build_preset().to_dict()
    assert values["fusion"].pop("background_quantile") is None
    assert values["fusion"].pop("background_target") == "mean"
    old = BuildConfig.from_dict(values).fusion
    assert old.background_quantile is None and old.background_target == "mean"
