"""The whole frame as one CUDA graph per input shape (the Runtime's ``graph`` backend).

At batch 1 the eager path launches over a thousand small kernels per frame and is bound by the
host, whatever the kernels do (docs/PERFORMANCE.md). A CUDA graph replays every launch of a
frame with one host call. :class:`FrameGraphs` captures a frame function (device uint8 frames
-> the Runtime's output maps: preprocessing, both branches with the structural stream forked
onto its own CUDA stream and joined inside the capture, fusion, the resize to the frame) once
per bucket, the frames' (B, H, W, 3) shape, into static buffers, and afterwards only copies the
frames in and replays.

A capture runs the function a few times first on a side stream (Triton autotuning, cuDNN's
algorithm choice and the caching allocator settle there, never inside the capture), so the
first call of a new shape is slow: :meth:`engine.Runtime.warmup` with the line's frame size and
batch captures it before the first real frame. Each bucket keeps its own memory pool; the least
recently used one is dropped beyond ``max_buckets``. What the function reads at capture time is
baked in: the calibration and the weights are the ones loaded, as in an exported engine.
The outputs are the graph's own buffers, overwritten by the next replay: copy them out first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

FrameFn = Callable[[torch.Tensor], list[torch.Tensor | None]]
WARMUP_RUNS = 3  # autotuning and the allocator settle in the first runs; three is cheap


@dataclass
class _Bucket:
    frames: torch.Tensor  # the static input the graph reads
    graph: torch.cuda.CUDAGraph
    outputs: list[torch.Tensor | None]  # the static outputs the graph writes


class FrameGraphs:
    """One captured CUDA graph of ``fn`` per frame shape, on ``device``.

    ``fn``: (B, H, W, 3) uint8 frames on ``device`` -> a list of tensors (or None), free of host
    synchronisation and of data-dependent control flow (capture raises otherwise).
    ``max_buckets``: shapes kept captured at once (>= 1).
    """

    def __init__(self, fn: FrameFn, device: torch.device, max_buckets: int = 4) -> None:
        if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
            raise ValueError(f"max_buckets must be an int >= 1, got {max_buckets!r}")
        if device.type != "cuda":
            raise RuntimeError(
                f"CUDA graphs need a CUDA device, got {device}; use another backend on CPU"
            )
        self.fn = fn
        # "cuda" means the current device; tensors always name their index
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[int, ...], _Bucket] = OrderedDict()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The frame shapes captured, least recently used first."""
        return list(self._buckets)

    def __call__(self, frames: torch.Tensor) -> list[torch.Tensor | None]:
        """``fn(frames)`` by replaying the graph of ``frames``' shape (captured on first use)."""
        if frames.device != self.device or frames.dtype != torch.uint8 or frames.dim() != 4:
            raise ValueError(
                f"expected (B, H, W, 3) uint8 frames on {self.device}, got "
                f"{tuple(frames.shape)} {frames.dtype} on {frames.device}"
            )
        key = tuple(frames.shape)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._capture(frames)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.frames.copy_(frames)
        bucket.graph.replay()
        return bucket.outputs

    def _capture(self, frames: torch.Tensor) -> _Bucket:
        static = frames.clone()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.fn(static)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(static)
        return _Bucket(static, graph, outputs)
