"""Separable Gaussian blur, and branch normalisation + weighted merge + blur (paper Eq. 11).

Border handling is scipy.ndimage's default ``mode="reflect"`` (half-sample symmetric:
``d c b a | a b c d | d c b a``), and the kernel radius is ``int(truncate * sigma + 0.5)``, so
the reference equals ``scipy.ndimage.gaussian_filter(x, sigma)`` per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kernels.dispatch import use_triton

MAX_MAPS = 3  # logical, structural, composition (SPEC §3.3, §3.5)

Affine = tuple[float, float, float]  # (weight, mean, std) of one branch


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


def branch_affine(name: str, affine: Sequence[float]) -> Affine:
    """``(weight, mean, std)`` as floats, checked: three finite numbers, and std > 0."""
    try:
        weight, mean, std = (float(v) for v in affine)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be three numbers (weight, mean, std), got {affine!r}"
        ) from None
    if not all(math.isfinite(v) for v in (weight, mean, std)) or std <= 0:
        raise ValueError(
            f"{name} needs a finite weight and mean and a positive finite std, "
            f"got weight={weight}, mean={mean}, std={std}"
        )
    return weight, mean, std


def check_merge_inputs(
    maps: Sequence[torch.Tensor], affines: Sequence[Sequence[float]]
) -> list[Affine]:
    """Validate 1..3 same-shape (B, H, W) float maps with one affine each; the checked affines."""
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence):
        raise ValueError(f"maps must be a sequence of (B, H, W) tensors, got {type(maps).__name__}")
    if not 1 <= len(maps) <= MAX_MAPS:
        raise ValueError(f"expected 1 to {MAX_MAPS} maps, got {len(maps)}")
    if isinstance(affines, torch.Tensor) or not isinstance(affines, Sequence):
        raise ValueError(f"affines must be a sequence of (weight, mean, std), got {affines!r}")
    if len(affines) != len(maps):
        raise ValueError(f"got {len(maps)} maps but {len(affines)} affines; need one per map")
    first = maps[0]
    for i, x in enumerate(maps):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            what = (
                f"shape {tuple(x.shape)} {x.dtype}"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            raise ValueError(f"maps[{i}] must be a (B, H, W) float tensor, got {what}")
        if x.shape != first.shape:
            raise ValueError(
                f"maps[{i}] has shape {tuple(x.shape)} but maps[0] has {tuple(first.shape)}; "
                "resize every map to one size first"
            )
    if first.shape[1] == 0 or first.shape[2] == 0:
        raise ValueError(f"maps have an empty spatial dim: {tuple(first.shape)}")
    return [branch_affine(f"affines[{i}]", a) for i, a in enumerate(affines)]


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
        maps: 1 to 3 branch maps, each (B, H, W) of one shape (callers resize), any float
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
    """Dispatcher for :func:`gaussian_blur_reference`."""
    if use_triton(backend, x):
        from kernels.blur_triton import gaussian_blur_triton

        return gaussian_blur_triton(x, sigma, truncate)
    return gaussian_blur_reference(x, sigma, truncate)


def normalize_merge_blur(
    maps: Sequence[torch.Tensor],
    affines: Sequence[Affine],
    sigma: float = 4.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatcher for :func:`normalize_merge_blur_reference` (Triton for CUDA maps)."""
    check_merge_inputs(maps, affines)
    if use_triton(backend, *maps):
        from kernels.blur_triton import normalize_merge_blur_triton

        return normalize_merge_blur_triton(maps, affines, sigma)
    return normalize_merge_blur_reference(maps, affines, sigma)
