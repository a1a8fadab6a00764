"""tools.predict: one record per image with the Runtime's score; bad images skipped loudly."""

from __future__ import annotations

import csv
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Runtime
from tools import predict

TINY = runpy.run_path(str(Path(__file__).parents[1] / "reliability" / "tiny.py"))


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    detector, config = TINY["tiny_detector"](0)
    return TINY["save"](tmp_path / "art", detector, config)


def images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(1)
    paths = [folder / f"{i:03d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return paths


def test_records_match_the_runtime(artifact: Path, tmp_path: Path, capsys) -> None:
    paths = images(tmp_path / "in", 3)
    out = tmp_path / "scores.csv"
    argv = [f"--artifact={artifact}", f"--input={tmp_path / 'in'}", f"--out={out}"]
    assert predict.main([*argv, "--device=cpu", "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    runtime = Runtime.load(artifact, device="cpu")
    assert [r["source"] for r in rows] == [str(p) for p in paths]
    for row, path in zip(rows, paths, strict=True):
        want = runtime(np.asarray(Image.open(path)), color="rgb").score
        assert float(row["score"]) == pytest.approx(want, rel=1e-5)
    assert "3 images scored" in capsys.readouterr().out


def test_unreadable_image_is_skipped_and_exit_2(
    artifact: Path, tmp_path: Path, capsys, caplog
) -> None:
    images(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "scores.jsonl"
    argv = [f"--artifact={artifact}", f"--input={tmp_path / 'in'}", f"--out={out}", "--no-progress"]
    assert predict.main(argv) == 2
    assert len(out.read_text().splitlines()) == 2
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "broken.png" in warning.getMessage()
    assert "1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no-folder", "bad-suffix"])
def test_bad_arguments(artifact: Path, tmp_path: Path, capsys, case: str) -> None:
    folder = tmp_path / "nope" if case == "no-folder" else tmp_path
    out = tmp_path / ("scores.csv" if case == "no-folder" else "scores.txt")
    argv = [f"--artifact={artifact}", f"--input={folder}", f"--out={out}"]
    assert predict.main(argv) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
