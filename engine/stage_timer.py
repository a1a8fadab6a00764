"""Per-stage times of a Detector call: CUDA events on GPU, ``perf_counter`` on CPU.

    timer = StageTimer(detector.device)
    detector.stage_timer = timer
    detector(frames)
    timer.elapsed_ms()   # {"preprocess": ..., "structural": ..., "logical": ..., "fuse": ...}

On CUDA the events are recorded on the stream each stage runs on (the structural stage on the
side stream), so a stage's time is its GPU time between its first and last kernel, including
waits on that stream; stages on two streams overlap, so the times need not add up to the call.
Reading them synchronises the device, so a timer belongs in profiling, not on the hot path.
"""

from __future__ import annotations

import time

import torch


class StageTimer:
    """Start/stop marks per stage name; the last call's marks only (``start`` of a stage seen
    before replaces it)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: dict[str, list] = {}

    def _mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, name: str) -> None:
        self._marks[name] = [self._mark()]

    def stop(self, name: str) -> None:
        if name not in self._marks:
            raise RuntimeError(f"stage {name!r} was stopped without being started")
        self._marks[name].append(self._mark())

    def elapsed_ms(self) -> dict[str, float]:
        """Milliseconds per finished stage, in the order they started."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for name, marks in self._marks.items():
            if len(marks) == 2:
                start, stop = marks
                out[name] = start.elapsed_time(stop) if self.cuda else (stop - start) * 1e3
        return out
