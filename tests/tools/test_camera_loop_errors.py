"""``tools.camera_loop`` on bad sources and lost cameras: a message and exit 2, no traceback.

The Runtime is a stand-in (no build): its score is the mean of the frame's first channel / 255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine import sources
from engine.detector import Maps
from engine.models.fusion import Fusion
from engine.runtime import Runtime
from tools import camera_loop


class MeanDetector:
    device = torch.device("cpu")
    precision = "fp32"

    def __init__(self) -> None:
        self.fusion = Fusion(("logical", "structural"), {"logical": 1, "structural": 1}, 1.0)

    def __call__(self, frames: torch.Tensor) -> Maps:
        score = frames[..., 0].float().mean(dim=(1, 2)) / 255.0
        fused = score[:, None, None].expand(-1, 4, 4).contiguous()
        return Maps(fused, fused, fused)


class FakeCamera:
    """A live capture: serves ``frames`` (None: a failed read), then fails forever."""

    def __init__(self, frames: list[np.ndarray | None]) -> None:
        self.frames, self.released = list(frames), 0

    def read(self) -> tuple[bool, np.ndarray | None]:
        frame = self.frames.pop(0) if self.frames else None
        return frame is not None, frame

    def isOpened(self) -> bool:  # OpenCV's name
        return True

    def get(self, prop: int) -> float:
        return -1.0  # what OpenCV reports as a live camera's frame count

    def release(self) -> None:
        self.released += 1


FRAME = np.full((6, 8, 3), 40, np.uint8)


@pytest.fixture(autouse=True)
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = Runtime(MeanDetector(), {"threshold": 0.5, "category": "fake"}, "eager")
    monkeypatch.setattr(camera_loop.Runtime, "load", lambda *args, **kwargs: rt)
    monkeypatch.setattr(sources.time, "sleep", lambda seconds: None)


def run(*extra: str) -> int:
    return camera_loop.main(["--artifact=unused", "--device=cpu", *extra])


def camera(monkeypatch: pytest.MonkeyPatch, frames: list[np.ndarray | None]) -> FakeCamera:
    capture = FakeCamera(frames)
    monkeypatch.setattr(camera_loop, "open_camera", lambda index: capture)
    return capture


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/nonexistent.mp4", "no such video file or image folder"),
        ("{tmp}", "unexpected folder"),  # a folder holding a sub-folder: not an image folder
        ("{tmp}/empty", "holds no images"),
    ],
)
def test_bad_source_exits_2_with_a_message(tmp_path: Path, capsys, source: str, message: str):
    (tmp_path / "empty").mkdir()
    assert run(f"--source={source.format(tmp=tmp_path)}") == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source=-1"], "camera index must be >= 0"),
        (["--max-frames=-1"], "must be >= 0"),
        (["--device=foo"], "invalid choice"),
        (["--backend=fast"], "invalid choice"),
    ],
)
def test_bad_options_are_argparse_errors(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_lost_camera_exits_2_with_a_message(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    capture = camera(monkeypatch, [FRAME, FRAME, FRAME])
    assert run("--source=0") == 2
    captured = capsys.readouterr()
    assert "stopped delivering frames after 3 frame(s)" in captured.err
    assert "--reconnect" in captured.err
    assert "3 frames, 0 anomalous" in captured.out
    assert capture.released == 1  # opened by the tool, released by it


def test_camera_that_comes_back_is_reconnected(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    capture = camera(monkeypatch, [FRAME, None, None, FRAME, FRAME])
    assert run("--source=0", "--reconnect=2", "--max-frames=3") == 0
    assert "3 frames" in capsys.readouterr().out
    assert capture.released == 1


def test_max_frames_zero_means_all(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys):
    from PIL import Image

    for name in "abcd":
        Image.fromarray(FRAME).save(tmp_path / f"{name}.png")
    assert run(f"--source={tmp_path}", "--max-frames=0") == 0
    assert "4 frames" in capsys.readouterr().out
    assert run(f"--source={tmp_path}", "--max-frames=2") == 0
    assert "2 frames" in capsys.readouterr().out


def test_camera_urls_stay_strings(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    opened: list[Any] = []

    def fake_open(target: Any) -> FakeCamera:
        opened.append(target)
        return FakeCamera([FRAME])

    monkeypatch.setattr(sources, "_open_capture", fake_open)
    url = "rtsp://user:pw@10.0.0.7:554/stream1"
    assert camera_loop.parse_source(url) == url
    assert run(f"--source={url}", "--max-frames=1") == 0
    assert opened == [url]


def test_latest_mode_scores_frames_and_reports_a_lost_camera(monkeypatch, capsys) -> None:
    capture = camera(monkeypatch, [FRAME, FRAME, FRAME])
    assert run("--source=0", "--latest") == 2  # the camera died after its frames
    captured = capsys.readouterr()
    assert "stopped delivering frames" in captured.err
    assert "frame " in captured.out and capture.released == 1


def test_alarm_retention_deletes_only_alarms_it_wrote(tmp_path: Path) -> None:
    mine = tmp_path / "holiday_raw.png"  # the user's file, with a name like ours
    mine.write_bytes(b"keep me")
    image = np.zeros((4, 4, 3), np.uint8)
    for index in range(3):
        result = type("R", (), {"source_index": index})()
        camera_loop.save_alarm(tmp_path, result, image, image, keep=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "holiday_raw.png" in names and mine.read_bytes() == b"keep me"
    alarms = [n for n in names if n != "holiday_raw.png"]
    assert len(alarms) == 2 and all("_000002_" in n for n in alarms)
