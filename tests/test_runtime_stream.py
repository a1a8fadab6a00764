"""Runtime and Runtime.stream contracts on a stand-in detector and fake captures (no build).

The stand-in's fused map is constant: the mean of the frame's first channel after the Runtime's
colour handling (so red for a correctly flipped BGR frame) divided by 255; the threshold is 0.5.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine import sources
from engine.detector import Maps
from engine.models.fusion import Fusion
from engine.runtime import Runtime, SourceLost


class FakeDetector:
    device = torch.device("cpu")
    precision = "fp32"

    def __init__(self, fill: float | None = None, error: Exception | None = None) -> None:
        self.fill, self.error, self.calls = fill, error, 0
        self.fusion = Fusion(("logical", "structural"), {"logical": 1, "structural": 1}, 1.0)

    def __call__(self, frames: torch.Tensor) -> Maps:
        self.calls += 1
        if self.error is not None:
            raise self.error
        score = frames[..., 0].float().mean(dim=(1, 2)) / 255.0
        if self.fill is not None:
            score = torch.full_like(score, self.fill)
        fused = score[:, None, None].expand(-1, 4, 4).contiguous()
        return Maps(fused, fused, fused)


class FakeCapture:
    """``read()`` serves ``frames``; ``None`` entries (and everything after the list) fail."""

    def __init__(self, frames: list[np.ndarray | None], frame_count: float | None = -1.0) -> None:
        self.frames, self.frame_count = list(frames), frame_count
        self.reads = self.released = 0

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        frame = self.frames.pop(0) if self.frames else None
        return frame is not None, frame

    def isOpened(self) -> bool:  # OpenCV's name
        return True

    def get(self, prop: int) -> float:
        assert prop == sources.CAP_PROP_FRAME_COUNT
        return -1.0 if self.frame_count is None else self.frame_count

    def release(self) -> None:
        self.released += 1


class NoCountCapture(FakeCapture):
    """A capture object with ``read()`` only: no frame count, so live."""

    get = None  # type: ignore[assignment]


def make_runtime(detector: Any = None, threshold: float | None = None) -> Runtime:
    manifest = {"threshold": 0.5, "category": "fake"}
    return Runtime(detector or FakeDetector(), manifest, "eager", threshold)


def colored(red: int, green: int = 0, blue: int = 0, shape=(6, 8)) -> np.ndarray:
    """An RGB frame of one colour."""
    return np.broadcast_to(np.array([red, green, blue], np.uint8), (*shape, 3)).copy()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, FakeCapture]]:
    """Replace OpenCV: the first two opens serve a 2-frame live capture, later ones none; records
    (target, capture) per open."""
    log: list[tuple[Any, FakeCapture]] = []

    def fake_open(target: Any) -> FakeCapture:
        capture = FakeCapture([colored(0), colored(0)] if len(log) < 2 else [])
        log.append((target, capture))
        return capture

    monkeypatch.setattr(sources, "_open_capture", fake_open)
    return log


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(sources.time, "sleep", waited.append)
    return waited


# --- fail closed: thresholds and scores -------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "0.5", None])
def test_non_finite_threshold_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="threshold must be"):
        make_runtime(threshold=bad) if bad is not None else Runtime(FakeDetector(), {}, "eager")
    rt = make_runtime()
    with pytest.raises(ValueError, match="threshold must be"):
        rt.threshold = bad
    assert rt.threshold == 0.5


def test_non_finite_manifest_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="manifest's threshold must be finite"):
        Runtime(FakeDetector(), {"threshold": float("nan")}, "eager")


def test_load_refuses_a_non_finite_threshold_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threshold must be finite"):
        Runtime.load(tmp_path / "no-artifact", device="cpu", threshold=float("nan"))


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise_instead_of_passing(fill: float) -> None:
    rt = make_runtime(FakeDetector(fill=fill))
    with pytest.raises(RuntimeError, match=r"non-finite scores.*engine is broken"):
        rt(colored(0))
    with pytest.raises(RuntimeError, match="non-finite scores"):
        next(rt.stream([colored(0)]))


# --- frames of any layout ---------------------------------------------------------------------


def test_strided_frames_are_accepted() -> None:
    rt = make_runtime()
    rgb = colored(200, 10, 30, shape=(20, 30))
    bgr_view = rgb[..., ::-1]  # the usual conversion idiom: a view with a negative stride
    assert bgr_view.strides[-1] < 0
    assert rt(bgr_view).score == pytest.approx(200 / 255)
    assert rt(rgb, color="rgb").score == pytest.approx(200 / 255)
    crop = np.zeros((40, 60, 3), np.uint8)
    crop[::2, ::2] = rgb
    assert rt(crop[::2, ::2], color="rgb").score == pytest.approx(200 / 255)
    read_only = rgb.copy()
    read_only.flags.writeable = False
    assert rt([bgr_view, crop[::2, ::2, ::-1], read_only[:5]], color="bgr")[0].score > 0.7
    results = [r for _, r in rt.stream([bgr_view, bgr_view])]
    assert [r.source_index for r in results] == [0, 1]


def test_bgr_and_rgb_agree_on_a_flipped_frame() -> None:
    rt = make_runtime()
    rgb = colored(250, 0, 20)
    assert rt(rgb[..., ::-1]).is_anomalous and rt(rgb, color="rgb").is_anomalous
    assert not rt(rgb).is_anomalous  # read as BGR, red is 20


# --- stream: bad frames vs a broken engine ------------------------------------------------------


def test_stream_counts_skipped_frames(caplog: pytest.LogCaptureFixture) -> None:
    rt = make_runtime()
    frames = [colored(0), np.zeros((5, 5), np.uint8), "x", colored(0)]
    with caplog.at_level(logging.WARNING, logger="engine.runtime"):
        results = [r for _, r in rt.stream(frames)]
    assert [r.source_index for r in results] == [0, 3]
    assert "skipping frame 2 (2 skipped)" in caplog.text
    assert "2 bad frame(s) skipped" in caplog.text


@pytest.mark.parametrize(
    "error", [ValueError("size mismatch inside the model"), RuntimeError("CUDA error")]
)
def test_stream_raises_engine_errors_at_once(error: Exception, opened) -> None:
    detector = FakeDetector(error=error)
    stream = make_runtime(detector).stream(0)
    with pytest.raises(type(error), match=str(error)):
        next(stream)
    assert detector.calls == 1
    assert opened[0][1].released == 1


# --- stream: sources ----------------------------------------------------------------------------


def test_stream_opens_its_source_eagerly(tmp_path: Path) -> None:
    rt = make_runtime()
    with pytest.raises(ValueError, match="no such video file"):
        rt.stream(tmp_path / "missing.mp4")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="unexpected folder"):
        rt.stream(tmp_path)
    with pytest.raises(ValueError, match="holds no images"):
        rt.stream(tmp_path / "sub")
    with pytest.raises(ValueError, match="camera index must be >= 0"):
        rt.stream(-1)
    with pytest.raises(ValueError, match="color"):
        rt.stream([colored(0)], color="hsv")
    with pytest.raises(ValueError, match="reconnect"):
        rt.stream([colored(0)], reconnect=-1)


def test_stream_urls_reach_opencv_as_strings(opened) -> None:
    stream = make_runtime().stream("rtsp://10.0.0.7:554/line3")
    assert opened[0][0] == "rtsp://10.0.0.7:554/line3"
    stream.close()
    assert opened[0][1].released == 1


def test_lost_live_capture_raises(opened) -> None:
    rt = make_runtime()
    results = []
    with pytest.raises(SourceLost, match=r"video source 0 stopped delivering frames after 2"):
        for _, result in rt.stream(0):
            results.append(result)
    assert len(results) == 2
    assert opened[0][1].released == 1  # opened by the stream: released although it raised


@pytest.mark.parametrize("capture_type", [FakeCapture, NoCountCapture])
def test_lost_capture_passed_in_raises_and_is_not_released(capture_type: type) -> None:
    capture = capture_type([colored(0), colored(0)])
    results = []
    with pytest.raises(SourceLost, match="stopped delivering frames after 2"):
        results.extend(r for _, r in make_runtime().stream(capture))
    assert len(results) == 2 and capture.released == 0


def test_finite_capture_ends_normally() -> None:
    capture = FakeCapture([colored(0)] * 3, frame_count=3)
    results = [r for _, r in make_runtime().stream(capture)]
    assert len(results) == 3 and capture.released == 0


def test_video_file_ends_normally_and_is_released(tmp_path: Path, opened) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    results = [r for _, r in make_runtime().stream(video)]
    assert len(results) == 2
    assert opened[0][0] == str(video) and opened[0][1].released == 1


@pytest.mark.parametrize("frames_read", [0, 1])
def test_closing_the_stream_releases_what_it_opened(opened, frames_read: int) -> None:
    stream = make_runtime().stream(7)
    for _ in range(frames_read):
        next(stream)
    stream.close()
    assert opened[0][1].released == 1


def test_reconnect_bridges_a_dropout_of_a_capture_passed_in(sleeps: list[float]) -> None:
    capture = FakeCapture([colored(0), None, None, colored(0), colored(0)])
    stream = make_runtime().stream(capture, reconnect=2, reconnect_delay=0.25)
    assert [next(stream)[1].source_index for _ in range(3)] == [0, 1, 2]
    assert sleeps == [0.25, 0.5]
    stream.close()
    assert capture.released == 0


def test_reconnect_gives_up_after_its_attempts(sleeps: list[float]) -> None:
    capture = FakeCapture([colored(0), None, None, colored(0)])
    results = []
    with pytest.raises(SourceLost, match=r"after 2 frame.*3 reconnect attempt"):
        results.extend(r for _, r in make_runtime().stream(capture, reconnect=3))
    assert [r.source_index for r in results] == [0, 1]
    assert sleeps == [1.0, 2.0, 1.0, 2.0, 4.0]  # doubled, and reset by the frame that came back
    assert capture.released == 0


def test_reconnect_backs_off_up_to_a_cap(sleeps: list[float]) -> None:
    capture = NoCountCapture([])
    with pytest.raises(SourceLost, match="after 0 frame"):
        next(make_runtime().stream(capture, reconnect=8, reconnect_delay=1.0))
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_reconnect_reopens_a_source_it_opened(opened, sleeps: list[float]) -> None:
    results = []
    with pytest.raises(SourceLost):
        results.extend(r for _, r in make_runtime().stream("http://cam/feed", reconnect=1))
    # 2 frames, dropout, reopen: 2 more frames, dropout, reopen: nothing left to try
    assert [r.source_index for r in results] == [0, 1, 2, 3]
    assert [target for target, _ in opened] == ["http://cam/feed"] * 3
    assert all(capture.released == 1 for _, capture in opened)


# --- contracts: one Runtime per thread ----------------------------------------------------------


def test_a_concurrent_call_raises() -> None:
    entered, leave = threading.Event(), threading.Event()

    class SlowDetector(FakeDetector):
        def __call__(self, frames: torch.Tensor) -> Maps:
            entered.set()
            assert leave.wait(10)
            return super().__call__(frames)

    rt = make_runtime(SlowDetector())
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(rt(colored(255), color="rgb")))
    worker.start()
    try:
        assert entered.wait(10)
        with pytest.raises(RuntimeError, match="already running in another thread"):
            rt(colored(0))
    finally:
        leave.set()
        worker.join(10)
    assert len(results) == 1 and results[0].is_anomalous
    assert not rt(colored(0), color="rgb").is_anomalous  # free again once the first call returned


# --- stream(latest=True): a slow consumer gets the newest frame, never a backlog -----------------


class FastCamera(FakeCapture):
    """A live capture that always has a new frame, about every millisecond, up to ``total``."""

    def __init__(self, total: int = 100_000) -> None:
        super().__init__([], frame_count=None)
        self.total = total

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        time.sleep(0.001)
        return self.reads <= self.total, colored(0) if self.reads <= self.total else None


def test_latest_drops_frames_a_slow_consumer_cannot_take() -> None:
    camera = FastCamera()
    stream = make_runtime().stream(camera, latest=True)
    indices = []
    for _, result in stream:
        indices.append(result.source_index)
        time.sleep(0.03)  # a consumer ~30x slower than the camera
        if len(indices) == 5:
            break
    stream.close()
    gaps = np.diff(indices)
    # Frames were dropped, not queued: newer frames only, and on average more dropped than
    # delivered. (Not every gap: on a loaded machine the reader may get one frame in.)
    assert (gaps >= 1).all() and gaps.mean() >= 3, indices
    reads = camera.reads
    time.sleep(0.05)
    assert camera.reads == reads  # the reader thread stopped with the stream
    assert camera.released == 0  # a capture passed in stays its owner's


def test_latest_delivers_the_last_frame_then_the_loss() -> None:
    camera = FastCamera(total=20)
    results = []
    with pytest.raises(SourceLost):
        for _, result in make_runtime().stream(camera, latest=True):
            results.append(result.source_index)
    assert results and results[-1] == 19  # the newest frame before the camera died


def test_latest_on_a_finite_source_ends_normally() -> None:
    frames = [colored(200)] * 3
    got = [r.source_index for _, r in make_runtime().stream(frames, latest=True)]
    assert got and got[-1] == 2 and got == sorted(set(got))
