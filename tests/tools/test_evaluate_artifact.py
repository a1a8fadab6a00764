"""``tools.evaluate --artifact``: the deployed engine reproduces the build's fused metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.artifact import read_manifest
from tools import evaluate

pytestmark = pytest.mark.slow


def test_artifact_metrics_match_the_build(tiny_build: dict[str, Path], tmp_path: Path) -> None:
    argv = [f"--data-root={tiny_build['data']}", f"--artifact={tiny_build['artifact']}"]
    argv += [f"--out={tmp_path}", "--device=cpu", "--no-progress"]
    assert evaluate.main(argv) == 0
    measured = json.loads((tmp_path / "metrics.json").read_text())
    built = read_manifest(tiny_build["artifact"])["metrics"]["fused"]
    for kind in ("logical_anomalies", "structural_anomalies"):
        assert measured["classification"]["auc_roc"][kind] == pytest.approx(
            built["image_auroc"][kind], abs=1e-9
        )
        # The tool scores one image per batch, the build eight: maps differ by float32 noise
        # (~1e-5), which can move a pixel across one of the exact metric's thresholds (measured:
        # 0 on one CPU, 3e-6 on another); a wrong map moves AU-sPRO by whole percents.
        assert measured["localization"]["auc_spro"][kind]["0.05"] == pytest.approx(
            built["au_spro_0.05"][kind], abs=1e-4
        )


def test_artifact_and_maps_are_exclusive(tiny_build: dict[str, Path], tmp_path: Path) -> None:
    argv = [f"--data-root={tiny_build['data']}", f"--artifact={tiny_build['artifact']}"]
    argv += [f"--maps={tmp_path}", f"--out={tmp_path}"]
    with pytest.raises(SystemExit):
        evaluate.main(argv)


def test_broken_artifact_exits_with_a_message(tiny_loco: Path, tmp_path: Path, capsys) -> None:
    argv = [f"--data-root={tiny_loco}", f"--artifact={tmp_path / 'none'}", f"--out={tmp_path}/o"]
    assert evaluate.main(argv) == evaluate.EXIT_BAD_INPUT
    assert "no artifact folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
