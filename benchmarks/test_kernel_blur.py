"""Gaussian blur (σ = 4) and normalise + merge + blur at 256²: Triton vs reference.

GPU: batch 8. CPU: the reference only, batch 1; the Triton rows skip. Run:
``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from typing import Any

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


def maps() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logical = torch.rand(BATCH, SIDE, SIDE, generator=gen)
    structural = torch.rand(BATCH, SIDE, SIDE, generator=gen)
    return logical.to(DEVICE), structural.to(DEVICE)


def test_blur_reference(benchmark: object, timed: Any) -> None:
    benchmark.group = "blur 256"
    x, _ = maps()
    timed(benchmark, lambda: gaussian_blur_reference(x, 4.0))


@NEEDS_GPU
def test_blur_triton(benchmark: object, timed: Any) -> None:
    from kernels.blur_triton import gaussian_blur_triton

    benchmark.group = "blur 256"
    x, _ = maps()
    out = timed(benchmark, lambda: gaussian_blur_triton(x, 4.0))
    torch.testing.assert_close(out, gaussian_blur_reference(x, 4.0), atol=1e-5, rtol=1e-5)


def test_merge_blur_reference(benchmark: object, timed: Any) -> None:
    benchmark.group = "normalize+merge+blur 256"
    logical, structural = maps()
    timed(benchmark, lambda: normalize_merge_blur_reference(logical, structural, *STATS))


@NEEDS_GPU
def test_merge_blur_triton(benchmark: object, timed: Any) -> None:
    from kernels.blur_triton import normalize_merge_blur_triton

    benchmark.group = "normalize+merge+blur 256"
    logical, structural = maps()
    out = timed(benchmark, lambda: normalize_merge_blur_triton(logical, structural, *STATS))
    ref = normalize_merge_blur_reference(logical, structural, *STATS)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
