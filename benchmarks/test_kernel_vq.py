"""VQ nearest codeword: Triton vs the PyTorch reference, per ResNet-101 level at 256 px.

GPU: batch 8 (N = 8·h·w vectors of dim C, K = 16). CPU: the reference only, batch 1; the Triton
rows skip, as the CPU interpreter measures nothing useful. Run: ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels.vq import vq_nearest_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = 8 if CUDA else 1
NEEDS_GPU = pytest.mark.skipif(
    not CUDA, reason="Triton speed needs a CUDA GPU (the CPU interpreter is not a speed figure)"
)
# ResNet-101 layer1..3 at 256 px: (channels, side).
LEVELS = {"layer1": (256, 64), "layer2": (512, 32), "layer3": (1024, 16)}
CODEBOOK_SIZE = 16


def inputs(level: str) -> tuple[torch.Tensor, torch.Tensor]:
    channels, side = LEVELS[level]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * side * side, channels, generator=gen)
    codebook = torch.randn(CODEBOOK_SIZE, channels, generator=gen)
    return x.to(DEVICE), codebook.to(DEVICE)


@pytest.mark.parametrize("level", LEVELS)
def test_vq_reference(benchmark: object, timed: Any, level: str) -> None:
    benchmark.group = f"vq {level}"
    x, codebook = inputs(level)
    timed(benchmark, lambda: vq_nearest_reference(x, codebook))


@NEEDS_GPU
@pytest.mark.parametrize("level", LEVELS)
def test_vq_triton(benchmark: object, timed: Any, level: str) -> None:
    from kernels.vq_triton import vq_nearest_triton

    benchmark.group = f"vq {level}"
    x, codebook = inputs(level)
    idx, _ = timed(benchmark, lambda: vq_nearest_triton(x, codebook))
    assert (idx == vq_nearest_reference(x, codebook)[0]).float().mean() > 0.999
