"""``tools.camera_loop`` runs without a camera: on an image folder, a video file, or a fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import camera_loop

pytestmark = pytest.mark.slow


def _args(tiny_build: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"--artifact={tiny_build['artifact']}", f"--out={out}", "--device=cpu", *extra]


def test_image_folder(tiny_build: dict[str, Path], tmp_path: Path, capsys) -> None:
    folder = tiny_build["data"] / "pushpins" / "test" / "logical_anomalies"
    assert camera_loop.main(_args(tiny_build, tmp_path, f"--source={folder}")) == 0
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert "3 frames" in capsys.readouterr().out


def test_video_file(tiny_build: dict[str, Path], tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(4):
        writer.write(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    assert camera_loop.main(_args(tiny_build, out, f"--source={video}", "--max-frames=3")) == 0
    assert len(list(out.glob("*.png"))) == 3


def test_missing_camera_uses_the_fallback(tiny_build: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny_build["data"] / "pushpins" / "validation" / "good"
    argv = _args(tiny_build, tmp_path, "--source=57", f"--fallback={folder}", "--max-frames=2")
    assert camera_loop.main(argv) == 0
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_missing_camera_without_fallback_fails(tiny_build, tmp_path: Path, capsys) -> None:
    argv = _args(tiny_build, tmp_path, "--source=57", f"--fallback={tmp_path / 'none'}")
    assert camera_loop.main(argv) == 2
    assert "no camera at index 57" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_log_rows_match_the_results(tiny_build, tmp_path: Path, capsys, suffix: str) -> None:
    import csv
    import json

    from engine.artifact import read_manifest

    folder = tiny_build["data"] / "pushpins" / "test" / "logical_anomalies"
    log = tmp_path / f"line3{suffix}"
    argv = _args(tiny_build, tmp_path / "out", f"--source={folder}", f"--log={log}")
    assert camera_loop.main([*argv, "--threshold=0.5"]) == 0
    printed = [
        line.split() for line in capsys.readouterr().out.splitlines() if line[:6] == "frame "
    ]
    with log.open() as handle:
        rows = list(csv.DictReader(handle)) if suffix == ".csv" else list(map(json.loads, handle))
    assert len(rows) == len(printed) == 3
    seal = read_manifest(tiny_build["artifact"])["manifest_sha256"]
    for row, words in zip(rows, printed, strict=True):
        assert int(row["frame"]) == int(words[1])
        assert float(row["score"]) == pytest.approx(float(words[3]), abs=1e-3)
        assert float(row["threshold"]) == 0.5
        assert row["verdict"] == ("anomalous" if words[4] == "ANOMALY" else "ok")
        assert row["artifact_sha256"] == seal and row["source"] == str(folder)


def test_log_with_another_suffix_is_refused(tiny_build, tmp_path: Path, capsys) -> None:
    argv = _args(tiny_build, tmp_path, f"--log={tmp_path / 'log.txt'}")
    assert camera_loop.main(argv) == 2
    assert ".jsonl" in capsys.readouterr().err and not (tmp_path / "log.txt").exists()


def test_save_alarms_keeps_raw_and_overlay_of_the_newest(tiny_build, tmp_path: Path) -> None:
    folder = tiny_build["data"] / "pushpins" / "test" / "logical_anomalies"
    alarms = tmp_path / "alarms"
    argv = [f"--artifact={tiny_build['artifact']}", "--device=cpu", f"--source={folder}"]
    # Threshold far below every score: all 3 frames are alarms; keep the 2 newest.
    assert camera_loop.main([*argv, f"--save-alarms={alarms}", "--keep=2", "--threshold=-1e9"]) == 0
    names = sorted(p.name for p in alarms.iterdir())
    assert len(names) == 4 and [n.split("_")[1] for n in names[::2]] == ["000001", "000002"]
    assert {n.rsplit("_", 1)[1] for n in names} == {"raw.png", "overlay.png"}
    newest_raw = [n for n in names if n.endswith("_raw.png")][-1]
    raw = np.asarray(Image.open(alarms / newest_raw))  # frame 2's raw image, unchanged
    source = sorted(folder.iterdir())[2]
    assert np.array_equal(raw, np.asarray(Image.open(source).convert("RGB")))


def test_show_without_gui_says_what_to_install(tiny_build, tmp_path: Path, capsys) -> None:
    cv2 = pytest.importorskip("cv2")
    try:
        cv2.namedWindow("probe")
        cv2.destroyWindow("probe")
        pytest.skip("this OpenCV can open windows")
    except cv2.error:
        pass
    assert camera_loop.main(_args(tiny_build, tmp_path, "--show")) == 2
    err = capsys.readouterr().err
    assert "pip install opencv-python" in err and "headless" in err
