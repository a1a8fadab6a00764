"""composition.fine_parts in a build: fitted on the training images, its two distances
standardised on the validation images and taken as they are by the fusion; the Runtime runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.artifact import load_artifact, read_manifest
from engine.build import main
from engine.calibrate import BranchStats
from engine.runtime import Runtime

pytestmark = pytest.mark.slow


def test_a_build_with_fine_parts_calibrates_and_runs(
    tiny_loco: Path, tmp_path: Path, tiny_build_args: list[str]
) -> None:
    out = tmp_path / "art"
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={out}", *tiny_build_args]
    assert main([*argv, "--set=composition.fine_parts=true"]) == 0
    assert read_manifest(out)["config"]["composition"]["fine_parts"] is True
    detector, _ = load_artifact(out)
    composition = detector.composition
    assert composition is not None and composition.fine is not None
    assert np.isfinite(composition.group_scale.numpy()).all()
    assert (composition.group_scale > 0).all()
    # already in validation MADs: the fusion takes the composition score as it is
    assert detector.fusion.stats["composition"] == BranchStats(0.0, 1.0)
    assert detector.fusion.image_stats["composition"] == BranchStats(0.0, 1.0)
    frame = np.asarray(np.random.default_rng(0).integers(0, 256, (100, 170, 3)), np.uint8)
    assert np.isfinite(Runtime.load(out, device="cpu", backend="eager")(frame).score)
