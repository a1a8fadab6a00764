"""``tools.camera_loop`` runs without a camera: on an image folder, a video file, or a fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
