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
import math
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from engine.artifact import load_artifact
from engine.backends import apply_backend
from engine.calibrate import finite_threshold, resize_to
from engine.detector import Detector, check_precision
from engine.frame_graph import FrameGraphs
from engine.sources import LatestFrames, Source, SourceLost, open_source
from engine.transfers import Transfers

__all__ = ["BRANCH_MAPS", "COLORS", "Result", "Runtime", "SourceLost", "check_frame"]

log = logging.getLogger(__name__)
COLORS = ("bgr", "rgb")
BRANCH_MAPS = ("logical", "structural", "positional", "composition")


@dataclass
class Result:
    """One frame's verdict.

    ``score``: the image score, the maximum of ``anomaly_map``; always finite (fail closed: a NaN
    or infinite score means the engine is broken, and the call raises ``RuntimeError`` instead of
    returning a verdict). ``is_anomalous``: ``score > threshold``. ``anomaly_map``: (H, W)
    float32 at the frame's size (fused, normalised units). ``logical_map`` / ``structural_map`` /
    ``positional_map`` / ``composition_map``: each branch's raw map at model resolution (S, S);
    None when that branch is off or the Runtime was loaded without it (``branch_maps``).
    ``latency_ms``: wall time of the call that produced the result (for a batch, the whole batch). ``threshold``: the one ``is_anomalous``
    used. ``source_index``: position in the input batch or stream. ``precision``: the network
    precision that produced it (see :meth:`Runtime.load`).
    """

    score: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    logical_map: np.ndarray | None
    structural_map: np.ndarray | None
    latency_ms: float
    threshold: float
    source_index: int = 0
    composition_map: np.ndarray | None = None
    precision: str = "fp32"
    positional_map: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        """bool (H, W): pixels whose fused value is above the decision threshold. The score is
        the map's maximum, so the mask is non-empty exactly when the frame is anomalous."""
        return self.anomaly_map > self.threshold


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
    """A loaded artifact ready to score frames. Build with :meth:`load`.

    Fail closed: the threshold must be finite (``ValueError`` otherwise), and a frame whose score
    comes out NaN or infinite raises ``RuntimeError`` ("the engine is broken"), never a verdict.
    """

    def __init__(
        self,
        detector: Detector,
        manifest: dict[str, Any],
        backend: str,
        threshold: float | None = None,
        branch_maps: tuple[str, ...] = BRANCH_MAPS,
    ) -> None:
        self.detector = detector
        self.branch_maps = _check_branch_maps(branch_maps)
        self._transfers = Transfers(detector.device)
        self.manifest = manifest
        self.backend = backend
        if threshold is None:
            threshold = finite_threshold(manifest.get("threshold"), "the manifest's threshold")
        self.threshold = threshold
        self._busy = threading.Lock()
        # backend "graph": the whole frame replayed as one CUDA graph per frame shape
        self._graphs = FrameGraphs(self._outputs, detector.device) if backend == "graph" else None

    @property
    def threshold(self) -> float:
        """The decision threshold: a frame is anomalous when its score is above it. Held by the
        detector's fusion module (``detector.fusion.threshold``, a buffer)."""
        value = self.detector.fusion.threshold_value
        assert value is not None  # set in __init__
        return value

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.detector.fusion.set_threshold(value)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        backend: str = "auto",
        threshold: float | None = None,
        verify: bool = True,
        precision: str = "fp32",
        branch_maps: tuple[str, ...] = BRANCH_MAPS,
    ) -> Runtime:
        """Load the artifact at ``path``.

        ``device``: ``auto`` (CUDA when present) | ``cpu`` | ``cuda[:N]``. ``backend``: see
        :mod:`engine.backends`. ``threshold`` overrides the calibrated one. ``verify`` checks
        every file's sha256 (raises :class:`engine.artifact.ArtifactError` on a mismatch).
        ``precision``: ``fp32`` (the reference), ``bf16`` or ``fp16``: the networks run under
        autocast in that dtype and the memory bank is searched in it; preprocessing, the
        composition model and fusion stay float32. Meant for CUDA (on CPU 16-bit is slower).
        ``branch_maps``: the branch maps each :class:`Result` carries (a subset of
        :data:`BRANCH_MAPS`); ``()`` copies only the fused map back from the device.
        A non-finite ``threshold``, an unknown ``precision`` or branch map name raises
        ``ValueError`` before anything is loaded.
        """
        if threshold is not None:
            finite_threshold(threshold)
        branch_maps = _check_branch_maps(branch_maps)
        check_precision(precision)
        chosen_device = _pick_device(device)
        detector, manifest = load_artifact(path, chosen_device, verify)
        detector.set_precision(precision)
        chosen = apply_backend(detector, backend)
        return cls(detector, manifest, chosen, threshold, branch_maps)

    @property
    def device(self) -> torch.device:
        return self.detector.device

    @property
    def precision(self) -> str:
        return self.detector.precision

    @property
    def category(self) -> str:
        return str(self.manifest.get("category", ""))

    def __repr__(self) -> str:
        return (
            f"Runtime(category={self.category!r}, device={self.device}, backend={self.backend!r}, "
            f"precision={self.precision!r}, threshold={self.threshold:.4g})"
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
            return self._run(_as_tensor(check_frame(frames))[None], color)[0]
        finally:
            self._busy.release()

    def _run_list(self, frames: list[np.ndarray], color: str) -> list[Result]:
        if len({f.shape for f in frames}) == 1:
            return self._run(torch.from_numpy(np.stack(frames)), color)
        results = []
        for i, frame in enumerate(frames):
            result = self._run(_as_tensor(frame)[None], color)[0]
            result.source_index = i
            results.append(result)
        return results

    def _run(self, batch: torch.Tensor, color: str) -> list[Result]:
        """uint8 (B, H, W, 3) -> results; the timed part includes the host-device copies."""
        start = time.perf_counter()
        batch = self._transfers.to_device(batch)
        if color == "bgr":
            batch = batch.flip(-1)
        outputs = (self._graphs or self._outputs)(batch)
        full_np, logical, structural, positional, composition = self._transfers.to_host(outputs)
        assert full_np is not None
        scores = full_np.reshape(len(full_np), -1).max(axis=1)  # image score: the map's maximum
        if not np.isfinite(scores).all():
            raise RuntimeError(
                f"the engine produced non-finite scores {scores.tolist()}: the engine is broken "
                "(NaN/Inf in its weights, memory bank or calibration); no verdict was given"
            )
        latency = (time.perf_counter() - start) * 1e3
        threshold = self.threshold
        return [
            Result(
                score=float(scores[i]),
                is_anomalous=bool(scores[i] > threshold),
                anomaly_map=full_np[i],
                logical_map=None if logical is None else logical[i],
                structural_map=None if structural is None else structural[i],
                composition_map=None if composition is None else composition[i],
                positional_map=None if positional is None else positional[i],
                latency_ms=latency,
                threshold=threshold,
                source_index=i,
                precision=self.precision,
            )
            for i in range(len(scores))
        ]

    def _outputs(self, batch: torch.Tensor) -> list[torch.Tensor | None]:
        """uint8 RGB (B, H, W, 3) on the device -> the fused map at the frame's size, then each
        of :data:`BRANCH_MAPS` at model size (None where off or not asked for)."""
        maps = self.detector(batch)
        assert maps.fused is not None
        branches = maps.branches()
        wanted = [branches.get(name) if name in self.branch_maps else None for name in BRANCH_MAPS]
        return [resize_to(maps.fused, (int(batch.shape[1]), int(batch.shape[2]))), *wanted]

    def warmup(
        self, size: tuple[int, int] = (480, 640), iterations: int = 3, batch: int = 1
    ) -> float:
        """Run ``iterations`` black batches of ``batch`` frames of ``size`` (H, W) to trigger
        compilation, autotuning and (backend ``graph``) the capture of that frame shape; returns
        the last call's latency in ms. Warm up with the line's frame size and batch."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        frames = torch.zeros((batch, *size, 3), dtype=torch.uint8)
        results: list[Result] = []
        for _ in range(max(1, iterations)):
            results = self(frames, color="rgb")
        return results[0].latency_ms

    def stream(
        self,
        source: Any,
        color: str | None = None,
        *,
        reconnect: int = 0,
        reconnect_delay: float = 1.0,
        latest: bool = False,
    ) -> Iterator[tuple[np.ndarray, Result]]:
        """Score frames from ``source`` as they come; yields ``(frame, result)`` pairs.

        ``source``: an OpenCV ``VideoCapture`` (or anything with ``read() -> (ok, frame)``), a
        camera index, a stream URL (``rtsp://...``, passed to OpenCV as is), a video file, a
        folder of images (read as RGB), or any iterable of frames. The source is opened here, so
        a missing file or camera raises ``ValueError`` at this call, not at the first frame.
        ``color`` defaults to ``"rgb"`` for image folders and ``"bgr"`` otherwise (OpenCV's
        order); the frame is yielded in that order, ready for :func:`engine.overlay`.
        ``Result.source_index`` is the frame's position in the source.

        Failures are kept apart: a bad frame (wrong shape or dtype, unreadable image) is logged
        as a warning with the running count of skipped frames and skipped; any error of the
        engine itself is raised at once. A capture ends normally when it is *finite*: a video
        file, or a capture reporting ``CAP_PROP_FRAME_COUNT > 0``. Any other capture (camera
        index, URL, capture object without a frame count) is *live*: when its ``read()`` fails,
        :class:`SourceLost` is raised, after ``reconnect`` further attempts per outage, waiting
        ``reconnect_delay`` seconds, doubled each time up to
        :data:`engine.sources.MAX_BACKOFF_S`. A reconnect re-opens a source the stream opened
        itself, and retries ``read()`` on a capture passed in.
        Captures the stream opened are released when it ends, is closed or raises; captures
        passed in are left to their owner.

        ``latest=True`` (for live cameras): a background thread reads the source continuously
        and each step scores the newest frame, dropping those that arrived meanwhile, so the
        verdicts never lag behind the line (``source_index`` shows the gaps).
        """
        if color is not None and color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {color!r}")
        if isinstance(reconnect, bool) or not isinstance(reconnect, int) or reconnect < 0:
            raise ValueError(f"reconnect must be an int >= 0, got {reconnect!r}")
        if not (isinstance(reconnect_delay, int | float) and 0 <= reconnect_delay < math.inf):
            raise ValueError(
                f"reconnect_delay must be a finite number >= 0, got {reconnect_delay!r}"
            )
        opened = open_source(source, reconnect, float(reconnect_delay))
        scored = self._score(opened, color or opened.color, latest)
        next(scored)  # enter the generator's try, so that closing it even now releases the source
        return cast(Iterator[tuple[np.ndarray, Result]], scored)

    def _score(
        self, source: Source, color: str, latest: bool
    ) -> Generator[tuple[np.ndarray, Result] | None, None, None]:
        """The body of :meth:`stream`; its first ``yield`` (None) only primes the generator."""
        skipped = 0
        reader = LatestFrames(source.frames) if latest else None
        try:
            yield None
            for index, frame in reader or enumerate(source.frames):
                try:
                    if isinstance(frame, Exception):  # an image of a folder that did not decode
                        raise frame
                    checked = check_frame(frame, index)
                except ValueError as error:
                    skipped += 1
                    log.warning("skipping frame %d (%d skipped): %s", index, skipped, error)
                    continue
                result = self(checked, color=color)
                assert isinstance(result, Result)
                result.source_index = index
                yield frame, result
        finally:
            if reader is not None:
                reader.close()  # before releasing the capture it reads from
            source.close()
            if skipped:
                log.warning("stream from %s: %d bad frame(s) skipped", source.name, skipped)


def _check_branch_maps(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in names if name not in BRANCH_MAPS]
    if isinstance(names, str) or unknown:
        raise ValueError(f"branch_maps must be a subset of {BRANCH_MAPS}, got {names!r}")
    return tuple(names)


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


def _as_tensor(frame: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) frame of any layout as a tensor; copies only when it has to."""
    if not (frame.flags.c_contiguous and frame.flags.writeable):
        # torch.from_numpy refuses negative strides (frame[..., ::-1]) and warns on read-only data
        frame = frame.copy(order="C")
    return torch.from_numpy(frame)
