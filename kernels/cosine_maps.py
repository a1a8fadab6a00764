"""Logical anomaly map: per-level 1 - cosine over channels, bilinear upsampling, sum over levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.dispatch import check_no_autograd, use_triton
from kernels.ops import cosine_maps_op


def cosine_maps_reference(
    encoder: Sequence[torch.Tensor],
    decoder: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    align_corners: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Sum over levels of upsampled ``1 - cos(encoder_l, decoder_l)``.

    Args:
        encoder, decoder: per level, (B, C_l, h_l, w_l) feature maps of equal shape.
        out_size: (H, W) of the output map.
        align_corners: bilinear upsampling convention (RD4AD uses True).
        eps: each feature norm is clamped to at least ``eps`` before dividing.

    Returns:
        (B, H, W) float32 map.
    """
    if len(encoder) != len(decoder) or not encoder:
        raise ValueError("encoder and decoder must hold the same, non-zero number of levels")
    total = None
    for e, d in zip(encoder, decoder, strict=True):
        if e.shape != d.shape:
            raise ValueError(
                f"level shapes differ: encoder {tuple(e.shape)} vs decoder {tuple(d.shape)}"
            )
        e, d = e.float(), d.float()
        dot = (e * d).sum(1)
        norms = e.norm(dim=1).clamp_min(eps) * d.norm(dim=1).clamp_min(eps)
        level = (1.0 - dot / norms)[:, None]
        up = F.interpolate(level, size=out_size, mode="bilinear", align_corners=align_corners)[:, 0]
        total = up if total is None else total + up
    return total


def cosine_maps(
    encoder: Sequence[torch.Tensor],
    decoder: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    align_corners: bool = True,
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatcher for :func:`cosine_maps_reference` (same signature and result); the Triton path
    is the opaque operator ``torch.ops.npgmf.cosine_maps``."""
    if use_triton(backend, *encoder, *decoder):
        check_no_autograd("cosine_maps", *encoder, *decoder)
        return cosine_maps_op(
            list(encoder), list(decoder), list(out_size), bool(align_corners), float(eps)
        )
    return cosine_maps_reference(encoder, decoder, out_size, align_corners, eps)
