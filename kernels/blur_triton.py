"""Triton separable Gaussian blur, and the fused normalise + weighted merge + blur.

One kernel blurs along one axis of (B, H, W) maps with scipy's half-sample-symmetric ("reflect")
border; it is launched twice, along H and then along W, through a float32 intermediate. In the
fused version the first pass reads both branch maps and normalises and merges each tap on the fly,
so the merged map is never written out: three map-sized reads and two writes in all, in two
launches. A structural map of another size is bilinearly resized with torch first, as in the
reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.blur import branch_affine, gaussian_taps
from kernels.triton_support import (
    check_device,
    check_float_tensor,
    check_no_autograd,
    on_device,
    pick_configs,
)

GPU_CONFIGS = [
    triton.Config({"BLOCK_ALONG": a, "BLOCK_ACROSS": x}, num_warps=w)
    for a, x, w in [(16, 64, 4), (32, 32, 4), (32, 64, 4), (64, 32, 4), (64, 64, 8), (16, 128, 4)]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_ALONG": 64, "BLOCK_ACROSS": 64})


@triton.autotune(
    configs=pick_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["n_along", "n_across", "num_taps", "HAS_SECOND"],
    cache_results=True,
)
@triton.jit
def _blur_axis_kernel(
    a_ptr,
    b_ptr,
    taps_ptr,
    out_ptr,
    n_along,
    n_across,
    num_taps,
    sa_batch,
    sa_along,
    sa_across,
    sb_batch,
    sb_along,
    sb_across,
    so_batch,
    so_along,
    so_across,
    a_weight,
    a_mean,
    a_std,
    b_weight,
    b_mean,
    b_std,
    HAS_SECOND: tl.constexpr,
    BLOCK_ALONG: tl.constexpr,
    BLOCK_ACROSS: tl.constexpr,
):
    """1-D blur along one axis of ``v = a_weight * (a - a_mean) / a_std (+ same for b)``."""
    batch = tl.program_id(2).to(tl.int64)
    along = tl.program_id(0) * BLOCK_ALONG + tl.arange(0, BLOCK_ALONG)
    across = (tl.program_id(1) * BLOCK_ACROSS + tl.arange(0, BLOCK_ACROSS)).to(tl.int64)
    mask = (along < n_along)[:, None] & (across < n_across)[None, :]
    a_base = a_ptr + batch * sa_batch + across[None, :] * sa_across
    b_base = b_ptr + batch * sb_batch + across[None, :] * sb_across
    radius = num_taps // 2
    period = 2 * n_along

    acc = tl.zeros([BLOCK_ALONG, BLOCK_ACROSS], tl.float32)
    for t in range(num_taps):
        tap = tl.load(taps_ptr + t)
        # Half-sample symmetric index; "%" truncates like C, hence the second wrap.
        src = (along + t - radius) % period
        src = (src + period) % period
        src = tl.where(src >= n_along, period - 1 - src, src).to(tl.int64)
        a = tl.load(a_base + src[:, None] * sa_along, mask=mask, other=0.0).to(tl.float32)
        value = a_weight * (a - a_mean) / a_std
        if HAS_SECOND:
            b = tl.load(b_base + src[:, None] * sb_along, mask=mask, other=0.0).to(tl.float32)
            value += b_weight * (b - b_mean) / b_std
        acc += tap * value
    out = out_ptr + batch * so_batch + along.to(tl.int64)[:, None] * so_along
    tl.store(out + across[None, :] * so_across, acc, mask=mask)


@functools.lru_cache(maxsize=32)
def _device_taps(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    return gaussian_taps(sigma, truncate).to(device)


def _launch_axis(
    a: torch.Tensor,
    b: torch.Tensor | None,
    out: torch.Tensor,
    taps: torch.Tensor,
    axis: int,
    a_affine: tuple[float, float, float] = (1.0, 0.0, 1.0),
    b_affine: tuple[float, float, float] = (1.0, 0.0, 1.0),
) -> None:
    """Blur (B, H, W) ``a`` (merged with ``b`` when given) along ``axis`` (1 or 2) into ``out``."""
    across_axis = 3 - axis
    n_along, n_across = a.shape[axis], a.shape[across_axis]
    second = a if b is None else b

    def strides(t: torch.Tensor) -> tuple[int, int, int]:
        return t.stride(0), t.stride(axis), t.stride(across_axis)

    grid = lambda meta: (  # noqa: E731
        triton.cdiv(n_along, meta["BLOCK_ALONG"]),
        triton.cdiv(n_across, meta["BLOCK_ACROSS"]),
        a.shape[0],
    )
    _blur_axis_kernel[grid](
        a,
        second,
        taps,
        out,
        n_along,
        n_across,
        taps.numel(),
        *strides(a),
        *strides(second),
        *strides(out),
        *a_affine,
        *b_affine,
        HAS_SECOND=b is not None,
    )


def _check_maps(name: str, x: torch.Tensor) -> None:
    check_float_tensor(name, x, 3)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} has an empty spatial dim: {tuple(x.shape)}")


def gaussian_blur_triton(
    x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0
) -> torch.Tensor:
    """Triton version of :func:`kernels.blur.gaussian_blur_reference` (no autograd).

    Args:
        x: (B, H, W) maps, any strides, float16 / bfloat16 / float32.

    Returns:
        (B, H, W) float32, equal to ``scipy.ndimage.gaussian_filter`` per map.
    """
    _check_maps("x", x)
    device = check_device(x=x)
    check_no_autograd("gaussian_blur_triton", x)
    taps = _device_taps(float(sigma), float(truncate), device)
    across_h = torch.empty(x.shape, dtype=torch.float32, device=device)
    out = torch.empty_like(across_h)
    if x.shape[0] == 0:
        return out
    with on_device(device):
        _launch_axis(x, None, across_h, taps, axis=1)
        _launch_axis(across_h, None, out, taps, axis=2)
    return out


def normalize_merge_blur_triton(
    logical: torch.Tensor,
    structural: torch.Tensor,
    logical_stats: tuple[float, float],
    structural_stats: tuple[float, float],
    logical_weight: float = 3.0,
    structural_weight: float = 1.0,
    sigma: float = 4.0,
) -> torch.Tensor:
    """Triton version of :func:`kernels.blur.normalize_merge_blur_reference` (no autograd).

    Args:
        logical: (B, H, W) logical maps; structural: (B, h, w) structural maps (resized to
            (H, W) when the size differs).
        logical_stats, structural_stats: ``(mean, std)`` of each branch's validation pixels.

    Returns:
        (B, H, W) float32 fused, blurred map.
    """
    _check_maps("logical", logical)
    _check_maps("structural", structural)
    if logical.shape[0] != structural.shape[0]:
        raise ValueError(
            f"logical has batch {logical.shape[0]} but structural has {structural.shape[0]}"
        )
    device = check_device(logical=logical, structural=structural)
    check_no_autograd("normalize_merge_blur_triton", logical, structural)
    logical_affine = branch_affine("logical", logical_weight, logical_stats)
    structural_affine = branch_affine("structural", structural_weight, structural_stats)
    taps = _device_taps(float(sigma), 4.0, device)

    if structural.shape[-2:] != logical.shape[-2:]:
        structural = F.interpolate(
            structural.float()[:, None],
            size=logical.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )[:, 0]
    merged_h = torch.empty(logical.shape, dtype=torch.float32, device=device)
    out = torch.empty_like(merged_h)
    if logical.shape[0] == 0:
        return out
    with on_device(device):
        _launch_axis(logical, structural, merged_h, taps, 1, logical_affine, structural_affine)
        _launch_axis(merged_h, None, out, taps, axis=2)
    return out
