"""VQ nearest codeword: Triton vs the PyTorch reference, at the shapes and layout the engine uses.

Paper preset at 256 px: each decoder stage quantises the atrous block's output of its prior
level (layer2 / layer3 / layer4 of ResNet-101: 32², 16², 8² positions) in ``codebook_dim`` 256
against ``codebook_size`` 16 entries. The engine flattens the (B, 256, h, w) map with
``permute(0, 2, 3, 1).reshape(-1, 256)``, exactly as here, so at batch 1 the kernel reads a
column-major (N, 256) view. GPU: batch 1 and 8; CPU: the reference only, batch 1 (the Triton
rows skip: the CPU interpreter measures nothing useful). Run: ``pytest benchmarks
--benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.models.logical import LogicalConfig
from kernels.vq import vq_nearest_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCHES = (1, 8) if CUDA else (1,)
NEEDS_GPU = pytest.mark.skipif(
    not CUDA, reason="Triton speed needs a CUDA GPU (the CPU interpreter is not a speed figure)"
)
PRIOR_SIDES = {"layer2": 32, "layer3": 16, "layer4": 8}  # ResNet-101 at 256 px
CONFIG = LogicalConfig()


def inputs(level: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) vectors laid out as the engine passes them, and the (K, D) codebook."""
    side, dim = PRIOR_SIDES[level], CONFIG.codebook_dim
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, dim, side, side, generator=gen).to(DEVICE)
    codebook = torch.randn(CONFIG.codebook_size, dim, generator=gen).to(DEVICE)
    return z.permute(0, 2, 3, 1).reshape(-1, dim), codebook


def test_batch_1_input_is_column_major() -> None:
    x, _ = inputs("layer4", 1)
    assert x.stride() == (1, PRIOR_SIDES["layer4"] ** 2)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("level", PRIOR_SIDES)
def test_vq_reference(benchmark: object, timed: Any, level: str, batch: int) -> None:
    benchmark.group = f"vq {level} b{batch}"
    x, codebook = inputs(level, batch)
    timed(benchmark, lambda: vq_nearest_reference(x, codebook))


@NEEDS_GPU
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("level", PRIOR_SIDES)
def test_vq_triton(benchmark: object, timed: Any, level: str, batch: int) -> None:
    from kernels.vq_triton import vq_nearest_triton

    benchmark.group = f"vq {level} b{batch}"
    x, codebook = inputs(level, batch)
    idx, _ = timed(benchmark, lambda: vq_nearest_triton(x, codebook))
    assert (idx == vq_nearest_reference(x, codebook)[0]).float().mean() > 0.999
