"""Structural kNN: Triton vs ``torch.cdist(...).min()`` vs the chunked reference (cuBLAS).

The shapes and layout the engine uses: the patch features of B images at 256 px (a 32 x 32 grid
of 1024-d features with the paper preset) come out of ``PatchFeatures`` as
``flatten(2).transpose(1, 2)`` and are flattened to (B·1024, 1024), exactly as here, so at
batch 1 the queries are a column-major view. The bank has the size a LOCO category gives (10 %
of 360 images' patches: 36 864 rows). GPU: batch 1 and 8, fp32 and fp16, with the extra peak
GPU memory of each call in ``extra_info``. CPU: cdist and the reference at batch 1 on a 16 x 16
grid against 4 096 rows; the Triton rows skip. Run: ``pytest benchmarks --benchmark-only``.
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
SIDE, BANK, DIM = (32, 36_864, 1024) if CUDA else (16, 4096, 1024)
BATCHES = (1, 8) if CUDA else (1,)
DTYPES = [torch.float32, torch.float16] if CUDA else [torch.float32]


def inputs(dtype: torch.dtype, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B·SIDE², DIM) queries laid out as the engine passes them, the bank and its norms."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(batch, DIM, SIDE, SIDE, generator=gen).to(DEVICE, dtype)
    queries = grid.flatten(2).transpose(1, 2).reshape(-1, DIM)
    bank = torch.randn(BANK, DIM, generator=gen).to(DEVICE, dtype)
    return queries, bank, bank_sq_norms(bank)


def test_batch_1_queries_are_column_major() -> None:
    queries, _, _ = inputs(torch.float32, 1)
    assert queries.stride() == (1, SIDE * SIDE)


CASES = [pytest.param(d, b, id=f"{d}-b{b}".replace("torch.", "")) for d in DTYPES for b in BATCHES]


@pytest.mark.parametrize(("dtype", "batch"), CASES)
def test_knn_cdist(benchmark: object, timed: Any, dtype: torch.dtype, batch: int) -> None:
    benchmark.group = f"knn {dtype} b{batch}"
    queries, bank, _ = inputs(dtype, batch)
    timed(benchmark, lambda: torch.cdist(queries, bank).min(dim=1))


@pytest.mark.parametrize(("dtype", "batch"), CASES)
def test_knn_reference(benchmark: object, timed: Any, dtype: torch.dtype, batch: int) -> None:
    benchmark.group = f"knn {dtype} b{batch}"
    queries, bank, bank_sq = inputs(dtype, batch)
    timed(benchmark, lambda: knn_min_reference(queries, bank, bank_sq=bank_sq))


@NEEDS_GPU
@pytest.mark.parametrize(("dtype", "batch"), CASES)
def test_knn_triton(benchmark: object, timed: Any, dtype: torch.dtype, batch: int) -> None:
    from kernels.knn_triton import knn_min_triton

    benchmark.group = f"knn {dtype} b{batch}"
    queries, bank, bank_sq = inputs(dtype, batch)
    dist, _ = timed(benchmark, lambda: knn_min_triton(queries, bank, bank_sq=bank_sq))
    ref, _ = knn_min_reference(queries, bank, bank_sq=bank_sq)
    torch.testing.assert_close(dist, ref, atol=1e-2, rtol=1e-3)
