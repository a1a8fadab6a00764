"""Separable Gaussian blur, and branch normalisation + weighted merge + blur (paper Eq. 11).

Border handling is scipy.ndimage's default ``mode="reflect"`` (half-sample symmetric:
``d c b a | a b c d | d c b a``), and the kernel radius is ``int(truncate * sigma + 0.5)``, so
the reference equals ``scipy.ndimage.gaussian_filter(x, sigma)`` per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def gaussian_taps(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian weights, length ``2 * radius + 1`` (float32, CPU)."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    if not (truncate >= 0 and math.isfinite(truncate)):
        raise ValueError(f"truncate must be a finite number >= 0, got {truncate}")
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).float()


def branch_affine(
    branch: str, weight: float, stats: tuple[float, float]
) -> tuple[float, float, float]:
    """``(weight, mean, std)`` of one branch, checked: finite, and std > 0."""
    if len(stats) != 2:
        raise ValueError(f"{branch}_stats must be (mean, std), got {stats}")
    weight, mean, std = float(weight), float(stats[0]), float(stats[1])
    if not all(math.isfinite(v) for v in (weight, mean, std)) or std <= 0:
        raise ValueError(
            f"{branch} branch needs a finite weight and mean and a positive finite std, "
            f"got weight={weight}, mean={mean}, std={std}"
        )
    return weight, mean, std


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
    logical: torch.Tensor,
    structural: torch.Tensor,
    logical_stats: tuple[float, float],
    structural_stats: tuple[float, float],
    logical_weight: float = 3.0,
    structural_weight: float = 1.0,
    sigma: float = 4.0,
) -> torch.Tensor:
    """``blur(w_s * (S_s - mu_s) / sd_s + w_l * (S_l - mu_l) / sd_l)`` on (B, H, W) maps.

    ``*_stats`` are ``(mean, std)`` of all validation pixel scores of that branch. A branch whose
    map has another size than the logical map is bilinearly resized to it first.
    """
    w_l, mu_l, sd_l = branch_affine("logical", logical_weight, logical_stats)
    w_s, mu_s, sd_s = branch_affine("structural", structural_weight, structural_stats)
    if logical.dim() != 3 or structural.dim() != 3 or logical.shape[0] != structural.shape[0]:
        raise ValueError(
            "expected (B, H, W) logical and (B, h, w) structural maps, got "
            f"{tuple(logical.shape)} and {tuple(structural.shape)}"
        )
    if structural.shape[-2:] != logical.shape[-2:]:
        structural = F.interpolate(
            structural.float()[:, None],
            size=logical.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )[:, 0]
    merged = w_s * (structural.float() - mu_s) / sd_s + w_l * (logical.float() - mu_l) / sd_l
    return gaussian_blur_reference(merged, sigma)


def gaussian_blur(
    x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0, backend: str = "auto"
) -> torch.Tensor:
    """Dispatcher for :func:`gaussian_blur_reference`."""
    if use_triton(backend, x):
        from kernels.blur_triton import gaussian_blur_triton

        return gaussian_blur_triton(x, sigma, truncate)
    return gaussian_blur_reference(x, sigma, truncate)


def normalize_merge_blur(
    logical: torch.Tensor,
    structural: torch.Tensor,
    logical_stats: tuple[float, float],
    structural_stats: tuple[float, float],
    logical_weight: float = 3.0,
    structural_weight: float = 1.0,
    sigma: float = 4.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatcher for :func:`normalize_merge_blur_reference`."""
    args = (
        logical,
        structural,
        logical_stats,
        structural_stats,
        logical_weight,
        structural_weight,
        sigma,
    )
    if use_triton(backend, logical, structural):
        from kernels.blur_triton import normalize_merge_blur_triton

        return normalize_merge_blur_triton(*args)
    return normalize_merge_blur_reference(*args)
