"""tools.threshold: only the threshold and the seal change, the Runtime follows, bad input is
refused with the artifact untouched."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Runtime
from engine.artifact import ArtifactError
from engine.operating_point import false_alarm_rate, set_threshold
from tools import threshold

TINY = runpy.run_path(str(Path(__file__).parents[1] / "reliability" / "tiny.py"))


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    detector, config = TINY["tiny_detector"](0)
    return TINY["save"](tmp_path / "art", detector, config, threshold=1.5)


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_target_far_changes_only_threshold_and_seal(artifact: Path, capsys) -> None:
    before = manifest(artifact)
    # Stored validation scores [0.5, 1.0, 1.25]: rejecting at most a third leaves 1.0.
    assert threshold.main([f"--artifact={artifact}", "--target-far=0.34"]) == 0
    after = manifest(artifact)
    assert after["threshold"] == 1.0
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"threshold", "manifest_sha256"} and set(after) == set(before)
    assert Runtime.load(artifact, device="cpu").threshold == 1.0
    out = capsys.readouterr().out
    assert "1.5 -> 1" in out and "0.0% before, 33.3% now" in out


def test_threshold_directly_and_from_new_good_images(artifact: Path, tmp_path: Path) -> None:
    assert threshold.main([f"--artifact={artifact}", "--threshold=2.25"]) == 0
    assert manifest(artifact)["threshold"] == 2.25
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(good / f"{i}.png")
    argv = [f"--artifact={artifact}", "--target-far=0", f"--good={good}", "--device=cpu"]
    assert threshold.main(argv) == 0
    runtime = Runtime.load(artifact, device="cpu")
    scores = [runtime(np.asarray(Image.open(p)), color="rgb").score for p in sorted(good.iterdir())]
    assert runtime.threshold == pytest.approx(max(scores))  # rejects none of them


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold=nan"], "must be finite"),
        (["--target-far=1.5"], "false-alarm rate must be in"),
        (["--target-far=0.1", "--good=/nonexistent"], "nonexistent"),
    ],
)
def test_bad_input_leaves_the_artifact_untouched(artifact: Path, capsys, extra, message) -> None:
    before = (artifact / "manifest.json").read_bytes()
    assert threshold.main([f"--artifact={artifact}", *extra]) == 2
    assert message in capsys.readouterr().err
    assert (artifact / "manifest.json").read_bytes() == before


def test_a_changed_file_is_refused(artifact: Path) -> None:
    with (artifact / "logical.pt").open("ab") as handle:
        handle.write(b"x")
    with pytest.raises(ArtifactError, match=r"logical\.pt"):
        set_threshold(artifact, 2.0)


def test_false_alarm_rate() -> None:
    assert false_alarm_rate([1.0, 2.0, 3.0, 4.0], 2.5) == 0.5
    with pytest.raises(ValueError, match="no good-image scores"):
        false_alarm_rate([], 1.0)
