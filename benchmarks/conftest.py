"""Shared benchmark helpers: synchronised timing with the peak extra GPU memory recorded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

Timed = Callable[[Any, Callable[[], object]], object]


@pytest.fixture
def timed() -> Timed:
    """``timed(benchmark, fn)``: benchmark ``fn`` (synchronised on GPU), record its extra peak
    GPU memory in ``extra_info["peak_extra_mib"]``, and return ``fn``'s result."""
    cuda = torch.cuda.is_available()

    def run(benchmark: Any, fn: Callable[[], object]) -> object:
        def call() -> object:
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            return out

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        result = benchmark(call)
        if cuda:
            extra = torch.cuda.max_memory_allocated() - before
            benchmark.extra_info["peak_extra_mib"] = extra / 2**20
        benchmark.extra_info["device"] = "cuda" if cuda else "cpu"
        return result

    return run


@pytest.fixture(scope="session")
def timing_info() -> dict[str, Any]:
    """The manifest ``info`` of the random-weight, uncalibrated artifacts the Runtime benchmarks
    time (a fixed threshold, placeholder validation scores, no metrics)."""
    return {
        "category": "timing",
        "threshold": 1.0,
        "text_prior": {"kind": "learned", "prompt": "timing", "dim": None},
        "validation_scores": [0.5, 1.0],
        "metrics": {},
    }
