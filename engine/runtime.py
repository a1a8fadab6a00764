"""Deployment API: ``Runtime.load(artifact)``, then ``rt(frame)`` inside a capture loop.

    rt = Runtime.load("artifacts/pushpins")
    rt.warmup()
    for frame, result in rt.stream(0):        # camera 0, a video file, an image folder, ...
        print(result.score, result.is_anomalous)
        cv2.imshow("line 3", engine.overlay(frame, result))

Thread safety: a Runtime owns a CUDA stream and per-call state, so one instance must be used by
one thread at a time. Create one Runtime per thread (they may share a GPU); a call that enters
an instance already busy in another thread raises ``RuntimeError`` instead of racing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.artifact import load_artifact
from engine.backends import apply_backend
from engine.calibrate import image_scores, resize_to
from engine.data.images import list_image_files, read_rgb
from engine.data.types import DatasetError
from engine.detector import Detector

log = logging.getLogger(__name__)
COLORS = ("bgr", "rgb")


@dataclass
class Result:
    """One frame's verdict.

    ``anomaly_map``: (H, W) float32 at the frame's size (fused, normalised units; the image
    score is its maximum). ``logical_map`` / ``structural_map``: each branch's raw map at model
    resolution (S, S). ``latency_ms``: wall time of the call that produced the result (for a
    batch, the whole batch). ``threshold``: the one ``is_anomalous`` used. ``source_index``: position in the input batch or stream.
    """

    score: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    logical_map: np.ndarray
    structural_map: np.ndarray
    latency_ms: float
    threshold: float
    source_index: int = 0


def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for, but torch sees no CUDA device")
    return device


def check_frame(frame: Any, index: int = 0) -> np.ndarray:
    """A valid (H, W, 3) uint8 frame, or a ValueError saying exactly what is wrong."""
    where = f"frame {index}"
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"{where}: expected a numpy array, got {type(frame).__name__}")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        raise ValueError(f"{where}: contains NaN or Inf values")
    if frame.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected dtype uint8 (0..255), got {frame.dtype}; convert with "
            "np.clip(frame, 0, 255).astype(np.uint8)"
        )
    if frame.ndim != 3 or frame.shape[2] != 3:
        hint = " (grayscale: stack it to 3 channels)" if frame.ndim == 2 else ""
        hint = (
            " (RGBA/BGRA: drop the alpha channel)"
            if frame.ndim == 3 and frame.shape[2] == 4
            else hint
        )
        raise ValueError(f"{where}: expected shape (H, W, 3), got {frame.shape}{hint}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"{where}: empty frame of shape {frame.shape}")
    return frame


class Runtime:
    """A loaded artifact ready to score frames. Build with :meth:`load`."""

    def __init__(
        self,
        detector: Detector,
        manifest: dict[str, Any],
        backend: str,
        threshold: float | None = None,
    ) -> None:
        self.detector = detector
        self.manifest = manifest
        self.backend = backend
        self.threshold = float(manifest["threshold"] if threshold is None else threshold)
        self._busy = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        backend: str = "auto",
        threshold: float | None = None,
        verify: bool = True,
    ) -> Runtime:
        """Load the artifact at ``path``.

        ``device``: ``auto`` (CUDA when present) | ``cpu`` | ``cuda[:N]``. ``backend``: see
        :mod:`engine.backends`. ``threshold`` overrides the calibrated one. ``verify`` checks
        every file's sha256 (raises :class:`engine.artifact.ArtifactError` on a mismatch).
        """
        chosen_device = _pick_device(device)
        detector, manifest = load_artifact(path, chosen_device, verify)
        chosen = apply_backend(detector, backend)
        return cls(detector, manifest, chosen, threshold)

    @property
    def device(self) -> torch.device:
        return self.detector.device

    @property
    def category(self) -> str:
        return str(self.manifest.get("category", ""))

    def __repr__(self) -> str:
        return (
            f"Runtime(category={self.category!r}, device={self.device}, backend={self.backend!r}, "
            f"threshold={self.threshold:.4g})"
        )

    def __call__(
        self, frames: np.ndarray | list[np.ndarray] | torch.Tensor, color: str = "bgr"
    ) -> Result | list[Result]:
        """Score a frame, a list of frames or a batch.

        Args:
            frames: (H, W, 3) uint8 numpy frame (any size; resized inside); a list of them (sizes
                may differ); or a uint8 tensor batch (B, H, W, 3) on any device.
            color: channel order of the input, ``"bgr"`` (OpenCV) or ``"rgb"``.

        Returns:
            One :class:`Result` for a single frame, else a list in input order.
        """
        if color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {color!r}")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this Runtime is already running in another thread; use one Runtime per thread"
            )
        try:
            if isinstance(frames, torch.Tensor):
                return self._run(_check_batch(frames), color)
            if isinstance(frames, list | tuple):
                if not frames:
                    raise ValueError("got an empty list of frames")
                checked = [check_frame(f, i) for i, f in enumerate(frames)]
                return self._run_list(checked, color)
            return self._run(torch.from_numpy(check_frame(frames))[None], color)[0]
        finally:
            self._busy.release()

    def _run_list(self, frames: list[np.ndarray], color: str) -> list[Result]:
        if len({f.shape for f in frames}) == 1:
            return self._run(torch.from_numpy(np.stack(frames)), color)
        results = []
        for i, frame in enumerate(frames):
            result = self._run(torch.from_numpy(frame)[None], color)[0]
            result.source_index = i
            results.append(result)
        return results

    def _run(self, batch: torch.Tensor, color: str) -> list[Result]:
        """uint8 (B, H, W, 3) -> results; the timed part includes the host-device copies."""
        start = time.perf_counter()
        device = self.device
        if batch.device != device:
            if device.type == "cuda" and batch.device.type == "cpu":
                batch = batch.pin_memory()
            batch = batch.to(device, non_blocking=True)
        if color == "bgr":
            batch = batch.flip(-1)
        maps = self.detector(batch)
        assert maps.fused is not None
        height, width = int(batch.shape[1]), int(batch.shape[2])
        full = resize_to(maps.fused, (height, width))
        scores = image_scores(full).cpu().numpy()
        full_np = full.cpu().numpy()
        logical, structural = maps.logical.cpu().numpy(), maps.structural.cpu().numpy()
        latency = (time.perf_counter() - start) * 1e3
        return [
            Result(
                score=float(scores[i]),
                is_anomalous=bool(scores[i] > self.threshold),
                anomaly_map=full_np[i],
                logical_map=logical[i],
                structural_map=structural[i],
                latency_ms=latency,
                threshold=self.threshold,
                source_index=i,
            )
            for i in range(len(scores))
        ]

    def warmup(self, size: tuple[int, int] = (480, 640), iterations: int = 3) -> float:
        """Run ``iterations`` black frames of ``size`` (H, W) to trigger compilation and
        autotuning; returns the last call's latency in ms."""
        frame = np.zeros((*size, 3), dtype=np.uint8)
        result = None
        for _ in range(max(1, iterations)):
            result = self(frame, color="rgb")
        assert isinstance(result, Result)
        return result.latency_ms

    def stream(self, source: Any, color: str | None = None) -> Iterator[tuple[np.ndarray, Result]]:
        """Score frames from ``source`` as they come; yields ``(frame, result)`` pairs.

        ``source``: an OpenCV ``VideoCapture`` (or anything with ``read() -> (ok, frame)``), a
        camera index, a video file, a folder of images (read as RGB), or any iterable of frames.
        A bad frame (wrong shape, unreadable image) is logged as a warning and skipped;
        ``Result.source_index`` is the frame's position in the source. ``color`` defaults to
        ``"rgb"`` for image folders and ``"bgr"`` otherwise (OpenCV's order); the frame is
        yielded in that order, ready for :func:`engine.overlay` with the same ``color``.
        """
        frames, default_color = _frames_from(source)
        chosen = color or default_color
        for index, frame in enumerate(frames):
            try:
                if isinstance(frame, Exception):
                    raise frame
                result = self(check_frame(frame, index), color=chosen)
            except (ValueError, DatasetError) as error:
                log.warning("skipping frame %d: %s", index, error)
                continue
            assert isinstance(result, Result)
            result.source_index = index
            yield frame, result


def _check_batch(frames: torch.Tensor) -> torch.Tensor:
    if frames.dtype.is_floating_point and not torch.isfinite(frames).all():
        raise ValueError("the frame batch contains NaN or Inf values")
    if frames.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 frame batch, got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"expected a (B, H, W, 3) frame batch with B > 0, got {tuple(frames.shape)}"
        )
    return frames


def _frames_from(source: Any) -> tuple[Iterable[Any], str]:
    """(iterable of frames or errors, default colour order) for a stream source."""
    if hasattr(source, "read") and callable(source.read):
        return _capture_frames(source), "bgr"
    if isinstance(source, int) and not isinstance(source, bool):
        return _capture_frames(_open_capture(source)), "bgr"
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_dir():
            files = list_image_files(path)
            if not files:
                raise ValueError(f"{path}: folder holds no images")
            return (_read_or_error(f) for f in files), "rgb"
        if not path.is_file():
            raise ValueError(f"{path}: no such video file or image folder")
        return _capture_frames(_open_capture(str(path))), "bgr"
    if isinstance(source, Iterable):
        return source, "bgr"
    raise ValueError(
        f"unsupported stream source {type(source).__name__}: pass a VideoCapture, a camera "
        "index, a video file, an image folder or an iterable of frames"
    )


def _open_capture(target: int | str) -> Any:
    try:
        import cv2
    except ImportError as error:
        raise RuntimeError(
            "cameras and video files need OpenCV: install the project's 'camera' extra"
        ) from error
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        raise ValueError(f"cannot open video source {target!r} (no such camera or unreadable file)")
    return capture


def _capture_frames(capture: Any) -> Iterator[np.ndarray]:
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _read_or_error(path: Path) -> np.ndarray | Exception:
    try:
        return read_rgb(path)
    except DatasetError as error:
        return error
