"""Gaussian blur (σ = 4) and normalise + merge + blur at 256²: Triton vs reference.

GPU: batch 8. CPU: the reference only, batch 1; the Triton rows skip. Run:
``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.blur import gaussian_blur_reference, normalize_merge_blur_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NEEDS_GPU = pytest.mark.skipif(
    not CUDA, reason="Triton speed needs a CUDA GPU (the CPU interpreter is not a speed figure)"
)
BATCH = 8 if CUDA else 1
SIDE = 256
STATS = ((0.5, 0.2), (1.0, 0.4))  # (mean, std) of the logical and structural branches


def timed(benchmark: object, fn: Callable[[], object]) -> object:
    """Benchmark ``fn`` (synchronised on GPU) and record its extra peak GPU memory."""

    def call() -> object:
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    result = benchmark(call)
    if CUDA:
        benchmark.extra_info["peak_extra_mib"] = (
            torch.cuda.max_memory_allocated() - before
        ) / 2**20
    benchmark.extra_info["device"] = str(DEVICE)
    return result


def maps() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logical = torch.rand(BATCH, SIDE, SIDE, generator=gen)
    structural = torch.rand(BATCH, SIDE, SIDE, generator=gen)
    return logical.to(DEVICE), structural.to(DEVICE)


def test_blur_reference(benchmark: object) -> None:
    benchmark.group = "blur 256"
    x, _ = maps()
    timed(benchmark, lambda: gaussian_blur_reference(x, 4.0))


@NEEDS_GPU
def test_blur_triton(benchmark: object) -> None:
    from kernels.blur_triton import gaussian_blur_triton

    benchmark.group = "blur 256"
    x, _ = maps()
    out = timed(benchmark, lambda: gaussian_blur_triton(x, 4.0))
    torch.testing.assert_close(out, gaussian_blur_reference(x, 4.0), atol=1e-5, rtol=1e-5)


def test_merge_blur_reference(benchmark: object) -> None:
    benchmark.group = "normalize+merge+blur 256"
    logical, structural = maps()
    timed(benchmark, lambda: normalize_merge_blur_reference(logical, structural, *STATS))


@NEEDS_GPU
def test_merge_blur_triton(benchmark: object) -> None:
    from kernels.blur_triton import normalize_merge_blur_triton

    benchmark.group = "normalize+merge+blur 256"
    logical, structural = maps()
    out = timed(benchmark, lambda: normalize_merge_blur_triton(logical, structural, *STATS))
    ref = normalize_merge_blur_reference(logical, structural, *STATS)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
