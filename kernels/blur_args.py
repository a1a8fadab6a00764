"""Argument handling shared by the blur reference (:mod:`kernels.blur`) and its Triton version
(:mod:`kernels.blur_triton`): a leaf module, so neither imports the other for these."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MAX_MAPS = 4  # logical, structural, positional, composition (SPEC §3.3, §3.5)

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
