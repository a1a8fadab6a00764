"""Host <-> device copies of a Runtime call through reused pinned buffers, one sync per call.

``t.cpu()`` on a CUDA tensor blocks the host once per tensor, and ``pin_memory()`` allocates
page-locked memory (slow) on every call. :class:`Transfers` keeps one pinned buffer per
(slot, shape, dtype), copies into it without blocking, and synchronises the stream once for all
of a call's outputs. On CPU it copies nothing it does not have to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MAX_BUFFERS = 16  # distinct (slot, shape, dtype) kept; frame sizes rarely vary on a line


class Transfers:
    """Staging for one Runtime (not thread-safe, as the Runtime itself)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: dict[tuple, torch.Tensor] = {}

    def _buffer(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        key = (slot, tuple(like.shape), like.dtype)
        buffer = self._pinned.get(key)
        if buffer is None:
            if len(self._pinned) >= MAX_BUFFERS:
                self._pinned.clear()
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self._pinned[key] = buffer
        return buffer

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` on :attr:`device`; a CPU batch bound for CUDA goes through a pinned buffer
        (safe to reuse: every call ends with :meth:`to_host`'s synchronisation)."""
        if batch.device == self.device:
            return batch
        if self.device.type == "cuda" and batch.device.type == "cpu":
            staged = self._buffer("input", batch)
            staged.copy_(batch)
            return staged.to(self.device, non_blocking=True)
        return batch.to(self.device)

    def to_host(self, tensors: Sequence[torch.Tensor | None]) -> list[np.ndarray | None]:
        """Each tensor as a numpy array the caller owns (None stays None), with at most one
        host synchronisation for all of them."""
        if self.device.type != "cuda":
            return [None if t is None else t.detach().cpu().numpy() for t in tensors]
        staged = []
        for i, tensor in enumerate(tensors):
            if tensor is None:
                staged.append(None)
                continue
            buffer = self._buffer(f"output{i}", tensor)
            buffer.copy_(tensor.detach(), non_blocking=True)
            staged.append(buffer)
        torch.cuda.current_stream(self.device).synchronize()
        # Copied out: the buffers are overwritten by the next call.
        return [None if b is None else b.numpy().copy() for b in staged]
