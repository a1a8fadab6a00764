"""Structural kNN: Triton vs ``torch.cdist(...).min()`` vs the chunked reference.

GPU: 1024 queries × 30 000 × 1024-d bank (the paper preset), fp32 and fp16, with the extra peak
GPU memory of each call in ``extra_info``. CPU: cdist and the reference at 256 × 4096 × 1024; the
Triton rows skip. Run: ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels.knn import knn_min_reference
from kernels.knn_args import bank_sq_norms

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NEEDS_GPU = pytest.mark.skipif(
    not CUDA, reason="Triton speed needs a CUDA GPU (the CPU interpreter is not a speed figure)"
)
QUERIES, BANK, DIM = (1024, 30_000, 1024) if CUDA else (256, 4096, 1024)
DTYPES = [torch.float32, torch.float16] if CUDA else [torch.float32]


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(QUERIES, DIM, generator=gen).to(DEVICE, dtype)
    bank = torch.randn(BANK, DIM, generator=gen).to(DEVICE, dtype)
    return queries, bank, bank_sq_norms(bank)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_knn_cdist(benchmark: object, timed: Any, dtype: torch.dtype) -> None:
    benchmark.group = f"knn {dtype}"
    queries, bank, _ = inputs(dtype)
    timed(benchmark, lambda: torch.cdist(queries, bank).min(dim=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_knn_reference(benchmark: object, timed: Any, dtype: torch.dtype) -> None:
    benchmark.group = f"knn {dtype}"
    queries, bank, bank_sq = inputs(dtype)
    timed(benchmark, lambda: knn_min_reference(queries, bank, bank_sq=bank_sq))


@NEEDS_GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_knn_triton(benchmark: object, timed: Any, dtype: torch.dtype) -> None:
    from kernels.knn_triton import knn_min_triton

    benchmark.group = f"knn {dtype}"
    queries, bank, bank_sq = inputs(dtype)
    dist, _ = timed(benchmark, lambda: knn_min_triton(queries, bank, bank_sq=bank_sq))
    ref, _ = knn_min_reference(queries, bank, bank_sq=bank_sq)
    torch.testing.assert_close(dist, ref, atol=1e-2, rtol=1e-3)
