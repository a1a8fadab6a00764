"""Cosine maps + bilinear upsampling + level sum: Triton vs reference, ResNet-101 layer1..3 at 256 px.

GPU: batch 8. CPU: the reference only, batch 1; the Triton rows skip. Run:
``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels.cosine_maps import cosine_maps_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NEEDS_GPU = pytest.mark.skipif(
    not CUDA, reason="Triton speed needs a CUDA GPU (the CPU interpreter is not a speed figure)"
)
BATCH = 8 if CUDA else 1
LEVELS = [(256, 64), (512, 32), (1024, 16)]  # (channels, side) of layer1..3 at 256 px
OUT_SIZE = (256, 256)


def inputs(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    enc = [torch.randn(BATCH, c, s, s, generator=gen) for c, s in LEVELS]
    dec = [e + torch.randn(e.shape, generator=gen) for e in enc]
    return [e.to(DEVICE, dtype) for e in enc], [d.to(DEVICE, dtype) for d in dec]


DTYPES = [torch.float32, torch.float16] if CUDA else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_maps_reference(benchmark: object, timed: Any, dtype: torch.dtype) -> None:
    benchmark.group = f"cosine maps {dtype}"
    enc, dec = inputs(dtype)
    timed(benchmark, lambda: cosine_maps_reference(enc, dec, OUT_SIZE))


@NEEDS_GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_maps_triton(benchmark: object, timed: Any, dtype: torch.dtype) -> None:
    from kernels.cosine_maps_triton import cosine_maps_triton

    benchmark.group = f"cosine maps {dtype}"
    enc, dec = inputs(dtype)
    out = timed(benchmark, lambda: cosine_maps_triton(enc, dec, OUT_SIZE))
    torch.testing.assert_close(out, cosine_maps_reference(enc, dec, OUT_SIZE), atol=1e-3, rtol=1e-3)
