"""Stream sources for :meth:`engine.Runtime.stream`: cameras, stream URLs, video files, image
folders and iterables, opened at once, with reconnection for live sources and an optional
latest-frame mode that drops frames a slow consumer could not keep up with.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.images import list_image_files, read_rgb
from engine.data.types import DatasetError

__all__ = ["MAX_BACKOFF_S", "Capture", "LatestFrames", "Source", "SourceLost", "open_source"]

log = logging.getLogger(__name__)
CAP_PROP_FRAME_COUNT = 7  # cv2.CAP_PROP_FRAME_COUNT, read without importing OpenCV
MAX_BACKOFF_S = 30.0  # longest wait between two reconnect attempts
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # rtsp://, http://, ...: handed to OpenCV as is


class SourceLost(ConnectionError):
    """A live video source (camera, stream URL) stopped delivering frames."""


class Capture:
    """A ``read() -> (ok, frame)`` source. ``target`` (index or string) when the stream opened
    it, so that it can re-open and must release it; None for a capture passed in."""

    def __init__(self, capture: Any, target: int | str | None, finite: bool) -> None:
        self.capture, self.target, self.finite = capture, target, finite
        self.name = f"video source {target!r}" if target is not None else type(capture).__name__

    def frames(self, reconnect: int, delay: float) -> Iterator[np.ndarray]:
        delivered = 0
        while True:
            ok, frame = self.capture.read()
            if not ok:
                if self.finite:
                    return
                frame = self._recover(reconnect, delay, delivered)
            delivered += 1
            yield frame

    def _recover(self, attempts: int, delay: float, delivered: int) -> np.ndarray:
        """The next frame after a failed read, or SourceLost once ``attempts`` are spent."""
        for attempt in range(attempts):
            wait = min(delay * 2**attempt, MAX_BACKOFF_S)
            log.warning(
                "%s: no frame; reconnect attempt %d of %d in %.1f s",
                self.name,
                attempt + 1,
                attempts,
                wait,
            )
            time.sleep(wait)
            if self._reopen():
                ok, frame = self.capture.read()
                if ok:
                    log.warning("%s: reconnected", self.name)
                    return frame
        raise SourceLost(
            f"{self.name} stopped delivering frames after {delivered} frame(s) and "
            f"{attempts} reconnect attempt(s)"
        )

    def _reopen(self) -> bool:
        if self.target is None:
            return True
        self.capture.release()
        try:
            self.capture = _open_capture(self.target)
        except ValueError as error:
            log.warning("%s", error)
            return False
        return True

    def release(self) -> None:
        if self.target is not None:
            self.capture.release()


@dataclass
class Source:
    """An opened stream source: its frames (or the errors of unreadable images), default colour
    order, a name for messages, and what to call when the stream ends."""

    frames: Iterable[Any]
    color: str
    name: str
    close: Callable[[], None] = lambda: None


def open_source(source: Any, reconnect: int, delay: float) -> Source:
    """Open ``source`` now (see :meth:`Runtime.stream`); ValueError when it cannot be read."""
    capture = _capture_of(source)
    if capture is not None:
        return Source(capture.frames(reconnect, delay), "bgr", capture.name, capture.release)
    if isinstance(source, str | Path) and Path(source).is_dir():
        try:
            files = list_image_files(Path(source))
        except OSError as error:
            raise ValueError(f"{source}: cannot read the image folder ({error})") from error
        if not files:
            raise ValueError(f"{source}: folder holds no images")
        return Source((_read_or_error(f) for f in files), "rgb", str(source))
    if isinstance(source, str | Path):
        raise ValueError(f"{source}: no such video file or image folder")
    if isinstance(source, Iterable):
        return Source(source, "bgr", type(source).__name__)
    raise ValueError(
        f"unsupported stream source {type(source).__name__}: pass a VideoCapture, a camera "
        "index, a stream URL, a video file, an image folder or an iterable of frames"
    )


def _capture_of(source: Any) -> Capture | None:
    """``source`` as a capture (opened now when it is an index, URL or file), else None."""
    if hasattr(source, "read") and callable(source.read):
        return Capture(source, None, finite=_reports_frame_count(source))
    if isinstance(source, int) and not isinstance(source, bool):
        if source < 0:
            raise ValueError(f"camera index must be >= 0, got {source}")
        return Capture(_open_capture(source), source, finite=False)
    if isinstance(source, str) and _URL.match(source):
        return Capture(_open_capture(source), source, finite=False)
    if isinstance(source, str | Path) and Path(source).is_file():
        return Capture(_open_capture(str(source)), str(source), finite=True)
    return None


def _reports_frame_count(capture: Any) -> bool:
    """Whether a capture passed in is finite (a video file): it reports a frame count > 0."""
    get = getattr(capture, "get", None)
    try:
        return callable(get) and float(get(CAP_PROP_FRAME_COUNT)) > 0
    except (TypeError, ValueError):
        return False


def _open_capture(target: int | str) -> Any:
    try:
        import cv2
    except ImportError as error:
        raise RuntimeError(
            "cameras and video files need OpenCV: install the project's 'camera' extra"
        ) from error
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        capture.release()
        raise ValueError(f"cannot open video source {target!r} (no such camera or unreadable file)")
    return capture


def _read_or_error(path: Path) -> np.ndarray | Exception:
    try:
        return read_rgb(path)
    except DatasetError as error:
        return error


class LatestFrames:
    """``(index, frame)`` pairs of ``frames``, read by a background thread that keeps only the
    newest: a consumer slower than a live camera gets the latest frame, never a backlog (the
    indices show what was dropped). An error of the source (e.g. :class:`SourceLost`) reaches
    the consumer after the frame read before it. :meth:`close` stops the reader."""

    def __init__(self, frames: Iterable[Any]) -> None:
        self._frames = iter(frames)
        self._ready = threading.Condition()
        self._slot: tuple[int, Any] | None = None
        self._error: BaseException | None = None
        self._done = self._stop = False
        self._thread = threading.Thread(target=self._read, name="npgmf-latest-frame", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for index, frame in enumerate(self._frames):
                with self._ready:
                    if self._stop:
                        return
                    self._slot = (index, frame)
                    self._ready.notify()
        except BaseException as error:  # handed to the consumer thread
            with self._ready:
                self._error = error
        finally:
            with self._ready:
                self._done = True
                self._ready.notify()

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        with self._ready:
            self._ready.wait_for(lambda: self._slot is not None or self._done)
            if self._slot is not None:
                item, self._slot = self._slot, None
                return item
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration

    def close(self, timeout: float = 10.0) -> None:
        """Stop the reader, waiting up to ``timeout`` s for a read in progress to return."""
        with self._ready:
            self._stop = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("latest-frame reader still blocked in a read after %.0f s", timeout)
