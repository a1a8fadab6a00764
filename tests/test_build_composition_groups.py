"""composition.fine_parts, composition.windows and composition.members in a build: fitted on
the training images, their distances standardised on the validation images (the window sizes
checked there) and taken as they are by the fusion; the Runtime runs them. The same for
composition.absence_sigma, whose map is standardised there without any group to calibrate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.artifact import load_artifact, read_manifest
from engine.build import main
from engine.calibrate import BranchStats
from engine.runtime import Runtime

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("option", "key", "value"),
    [
        ("composition.fine_parts=true", "fine_parts", True),
        ("composition.windows=4,2", "windows", [4, 2]),
        ("composition.members=2", "members", 2),
    ],
)
def test_a_build_with_composition_groups_calibrates_and_runs(
    tiny_loco: Path, tmp_path: Path, tiny_build_args: list[str], option: str, key: str, value
) -> None:
    out = tmp_path / "art"
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={out}", *tiny_build_args]
    # the cpu preset fits three members, which fine parts and windows do not combine with
    single = [] if key == "members" else ["--set=composition.members=1"]
    assert main([*argv, *single, f"--set={option}"]) == 0
    assert read_manifest(out)["config"]["composition"][key] == value
    detector, _ = load_artifact(out)
    composition = detector.composition
    assert composition is not None
    assert (composition.fine is not None) == (key == "fine_parts")
    assert (composition.windows is not None) == (key == "windows")
    assert len(composition.members) == (1 if key == "members" else 0)
    if key == "members":  # the members' mean, standardised again on the validation images
        assert float(composition.ensemble_scale) > 0
    if composition.windows is not None:  # checked on the validation images
        assert ((composition.window_auroc >= 0) & (composition.window_auroc <= 1)).all()
        checks = read_manifest(out)["composition_windows"]
        assert checks["divisions"] == [4, 2]
        assert checks["used"] == [a >= 0.75 for a in checks["rearranged_auroc"]]
    assert np.isfinite(composition.group_scale.numpy()).all()
    assert (composition.group_scale > 0).all()
    # already in validation MADs: the fusion takes the composition score as it is
    assert detector.fusion.stats["composition"] == BranchStats(0.0, 1.0)
    assert detector.fusion.image_stats["composition"] == BranchStats(0.0, 1.0)
    frame = np.asarray(np.random.default_rng(0).integers(0, 256, (100, 170, 3)), np.uint8)
    assert np.isfinite(Runtime.load(out, device="cpu", backend="eager")(frame).score)


def test_a_build_with_the_absence_map_calibrates_and_marks_it(
    tiny_loco: Path, tmp_path: Path, tiny_build_args: list[str]
) -> None:
    out = tmp_path / "art"
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={out}", *tiny_build_args]
    options = ["--set=composition.members=1", "--set=composition.absence_sigma=0.0625"]
    assert main([*argv, *options]) == 0
    assert read_manifest(out)["config"]["composition"]["absence_sigma"] == 0.0625
    detector, _ = load_artifact(out)
    assert detector.composition is not None and detector.composition.n_groups == 1
    absence = detector.composition.absence
    assert absence is not None and float(absence.peak_std) > 0
    assert detector.fusion.absence_weight == 1.0
    frame = np.asarray(np.random.default_rng(0).integers(0, 256, (100, 170, 3)), np.uint8)
    assert np.isfinite(Runtime.load(out, device="cpu", backend="eager")(frame).score)
