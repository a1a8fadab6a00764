"""``tools.visualize``: writes the PNGs it names, and refuses bad input with exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import visualize

PLOTS = (
    "roc.png", "spro_fpr.png", "score_histogram.png", "false_alarms.png", "misses.png",
    "detections.png",
)  # fmt: skip


@pytest.mark.slow
def test_writes_every_plot_it_names(tiny_build: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "plots"
    argv = [f"--artifact={tiny_build['artifact']}", f"--out={out}"]
    argv += [f"--data-root={tiny_build['data']}", "--device=cpu", "--no-progress", "--n=2"]
    assert visualize.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOTS)
    printed = capsys.readouterr().out
    assert all(name in printed for name in PLOTS)
    for name in PLOTS:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 10_000, name  # axes, curves and text, not an empty canvas
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        assert min(pixels.shape) >= 300, name
        assert len(np.unique(pixels)) > 16, name  # drawn content, not a flat image


@pytest.mark.parametrize("make", ["missing", "not_an_artifact", "bad_manifest"])
def test_bad_artifact_exits_2_without_traceback(tmp_path: Path, capsys, make: str) -> None:
    artifact = tmp_path / "artifact"
    if make != "missing":
        artifact.mkdir()
    if make == "bad_manifest":
        (artifact / "manifest.json").write_text("{not json")
    out = tmp_path / "plots"
    assert visualize.main([f"--artifact={artifact}", f"--out={out}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(artifact) in err
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_n_exits_2(tmp_path: Path, capsys) -> None:
    argv = [f"--artifact={tmp_path}", f"--out={tmp_path / 'plots'}", "--n=0"]
    assert visualize.main(argv) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_score_histogram_draws_every_kind_and_the_threshold(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = {"good": rng.normal(0, 1, 50), "logical_anomalies": rng.normal(3, 1, 40)}
    path = tmp_path / "hist.png"
    visualize.plot_score_histogram(scores, 1.5, path)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 400 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16
    with pytest.raises(ValueError, match="no image scores"):
        visualize.plot_score_histogram({"good": np.array([])}, 1.0, tmp_path / "empty.png")


def test_roc_and_pro_curves_are_drawn_from_scores_and_mvtec_metrics(tmp_path: Path) -> None:
    from engine.metrics import compute_mvtec_metrics

    rng = np.random.default_rng(1)
    visualize.plot_roc(rng.normal(0, 1, 20), {"crack": rng.normal(2, 1, 9)}, tmp_path / "roc.png")
    maps = [rng.random((16, 16)) for _ in range(4)]
    masks = [None, None, np.zeros((16, 16), bool), np.zeros((16, 16), bool)]
    masks[2][2:6, 2:6] = masks[3][8:12, 1:9] = True
    for anomaly_map, mask in zip(maps, masks, strict=True):
        if mask is not None:
            anomaly_map[mask] += 0.5
    visualize.plot_pro(compute_mvtec_metrics(maps, masks), tmp_path / "pro.png")
    for name in ("roc.png", "pro.png"):
        with Image.open(tmp_path / name) as image:
            pixels = np.asarray(image.convert("L"))
        assert min(pixels.shape) >= 300 and len(np.unique(pixels)) > 16, name
