"""Nearest-codeword search for vector quantisation (distance, argmin and gather)."""

from __future__ import annotations

import torch

from kernels.dispatch import check_no_autograd, use_triton
from kernels.ops import vq_nearest_op


def vq_nearest_reference(
    x: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry by squared L2 for every row of ``x``.

    Args:
        x: (N, D) vectors.
        codebook: (K, D) entries.

    Returns:
        ``(indices, quantized)``: (N,) int64 index of the nearest entry (first on ties) and the
        (N, D) gathered entries, in ``codebook``'s dtype. Distances are accumulated in float32.
    """
    xf, cf = x.float(), codebook.float()
    dist = (xf * xf).sum(1, keepdim=True) - 2.0 * xf @ cf.t() + (cf * cf).sum(1)[None, :]
    idx = dist.argmin(dim=1)
    return idx, codebook[idx]


def vq_nearest(
    x: torch.Tensor, codebook: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher for :func:`vq_nearest_reference` (same signature and result); the Triton path
    is the opaque operator ``torch.ops.npgmf.vq_nearest``."""
    if use_triton(backend, x, codebook):
        check_no_autograd("vq_nearest", x, codebook)
        return vq_nearest_op(x, codebook)
    return vq_nearest_reference(x, codebook)
