"""Separable Gaussian blur, and branch normalisation + weighted merge + blur (paper Eq. 11).

Border handling is scipy.ndimage's default ``mode="reflect"`` (half-sample symmetric:
``d c b a | a b c d | d c b a``), and the kernel radius is ``int(truncate * sigma + 0.5)``, so
the reference equals ``scipy.ndimage.gaussian_filter(x, sigma)`` per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.blur_args import Affine, check_merge_inputs, gaussian_taps
from kernels.dispatch import check_no_autograd, use_triton
from kernels.ops import gaussian_blur_op, normalize_merge_blur_op


def symmetric_indices(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of every padded position ``-radius .. n-1+radius`` under half-sample symmetry."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _blur_axis(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    radius = (taps.numel() - 1) // 2
    n = x.shape[dim]
    padded = x.index_select(dim, symmetric_indices(n, radius, x.device))
    windows = padded.unfold(dim, taps.numel(), 1)  # (..., n, ..., taps)
    return (windows * taps.to(x.device)).sum(-1)


def gaussian_blur_reference(
    x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0
) -> torch.Tensor:
    """Blur every (H, W) map of ``x`` (shape (B, H, W)); float32 result."""
    if x.dim() != 3:
        raise ValueError(f"expected (B, H, W) maps, got shape {tuple(x.shape)}")
    taps = gaussian_taps(sigma, truncate)
    return _blur_axis(_blur_axis(x.float(), taps, 1), taps, 2)


def normalize_merge_blur_reference(
    maps: Sequence[torch.Tensor], affines: Sequence[Affine], sigma: float = 4.0
) -> torch.Tensor:
    """``blur(sum_i weight_i * (maps[i] - mean_i) / std_i)``: the fused (B, H, W) float32 map.

    Args:
        maps: 1 to 4 branch maps, each (B, H, W) of one shape (callers resize), any float
            dtype and strides.
        affines: one ``(weight, mean, std)`` per map; mean and std are those of all the branch's
            validation pixel scores.
        sigma: Gaussian σ in pixels (truncated at 4 σ, scipy "reflect" borders).
    """
    checked = check_merge_inputs(maps, affines)
    merged = sum(w * (x.float() - mu) / sd for x, (w, mu, sd) in zip(maps, checked))
    return gaussian_blur_reference(merged, sigma)


def gaussian_blur(
    x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0, backend: str = "auto"
) -> torch.Tensor:
    """Dispatcher for :func:`gaussian_blur_reference`; the Triton path is the opaque operator
    ``torch.ops.npgmf.gaussian_blur``."""
    if use_triton(backend, x):
        check_no_autograd("gaussian_blur", x)
        return gaussian_blur_op(x, float(sigma), float(truncate))
    return gaussian_blur_reference(x, sigma, truncate)


def normalize_merge_blur(
    maps: Sequence[torch.Tensor],
    affines: Sequence[Affine],
    sigma: float = 4.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatcher for :func:`normalize_merge_blur_reference` (Triton for CUDA maps, through the
    opaque operator ``torch.ops.npgmf.normalize_merge_blur``)."""
    checked = check_merge_inputs(maps, affines)
    if use_triton(backend, *maps):
        check_no_autograd("normalize_merge_blur", *maps)
        weights, means, stds = (list(column) for column in zip(*checked, strict=True))
        return normalize_merge_blur_op(list(maps), weights, means, stds, float(sigma))
    return normalize_merge_blur_reference(maps, affines, sigma)
