"""Triton separable Gaussian blur, and the fused normalise + weighted merge + blur.

One kernel blurs along one axis of (B, H, W) maps with scipy's half-sample-symmetric ("reflect")
border; it is launched twice, along H and then along W, through a float32 intermediate. In the
fused version the first pass reads the 1 to 4 branch maps and normalises and merges each tap on
the fly, so the merged map is never written out: with n maps, n + 1 map-sized reads and two
writes in all, in two launches. The maps must already have one size (callers resize).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.blur_args import MAX_MAPS, Affine, check_merge_inputs, gaussian_taps
from kernels.triton_support import (
    check_device,
    check_float_tensor,
    check_no_autograd,
    on_device,
    pick_configs,
    size_bucket,
)

GPU_CONFIGS = [
    triton.Config({"BLOCK_ALONG": a, "BLOCK_ACROSS": x}, num_warps=w)
    for a, x, w in [(16, 64, 4), (32, 32, 4), (32, 64, 4), (64, 32, 4), (64, 64, 8), (16, 128, 4)]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_ALONG": 64, "BLOCK_ACROSS": 64})

IDENTITY = (1.0, 0.0)  # (scale, mean) of a plain blur; also fills the unused slots


@triton.jit
def _normalised_tap(base, src, s_along, mask, scale, mean):
    """``scale * (x - mean)`` of one map at the tap's source rows, in float32."""
    x = tl.load(base + src[:, None] * s_along, mask=mask, other=0.0).to(tl.float32)
    return scale * (x - mean)


@triton.autotune(
    configs=pick_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["n_along", "n_across", "num_taps", "batch_bucket", "NUM_MAPS"],
    cache_results=True,
)
@triton.jit
def _blur_axis_kernel(
    m0_ptr,
    m1_ptr,
    m2_ptr,
    m3_ptr,
    taps_ptr,
    out_ptr,
    n_along,
    n_across,
    num_taps,
    batch_bucket,  # autotune key only: the batch (grid axis 2) changes the best tiles
    s0_batch,
    s0_along,
    s0_across,
    s1_batch,
    s1_along,
    s1_across,
    s2_batch,
    s2_along,
    s2_across,
    s3_batch,
    s3_along,
    s3_across,
    so_batch,
    so_along,
    so_across,
    scale0,
    mean0,
    scale1,
    mean1,
    scale2,
    mean2,
    scale3,
    mean3,
    NUM_MAPS: tl.constexpr,
    BLOCK_ALONG: tl.constexpr,
    BLOCK_ACROSS: tl.constexpr,
):
    """1-D blur along one axis of ``v = sum_i scale_i * (m_i - mean_i)``, i < NUM_MAPS."""
    batch = tl.program_id(2).to(tl.int64)
    along = tl.program_id(0) * BLOCK_ALONG + tl.arange(0, BLOCK_ALONG)
    across = (tl.program_id(1) * BLOCK_ACROSS + tl.arange(0, BLOCK_ACROSS)).to(tl.int64)
    mask = (along < n_along)[:, None] & (across < n_across)[None, :]
    m0_base = m0_ptr + batch * s0_batch + across[None, :] * s0_across
    m1_base = m1_ptr + batch * s1_batch + across[None, :] * s1_across
    m2_base = m2_ptr + batch * s2_batch + across[None, :] * s2_across
    m3_base = m3_ptr + batch * s3_batch + across[None, :] * s3_across
    radius = num_taps // 2
    period = 2 * n_along

    acc = tl.zeros([BLOCK_ALONG, BLOCK_ACROSS], tl.float32)
    for t in range(num_taps):
        tap = tl.load(taps_ptr + t)
        # Half-sample symmetric index; "%" truncates like C, hence the second wrap.
        src = (along + t - radius) % period
        src = (src + period) % period
        src = tl.where(src >= n_along, period - 1 - src, src).to(tl.int64)
        value = _normalised_tap(m0_base, src, s0_along, mask, scale0, mean0)
        if NUM_MAPS >= 2:
            value += _normalised_tap(m1_base, src, s1_along, mask, scale1, mean1)
        if NUM_MAPS >= 3:
            value += _normalised_tap(m2_base, src, s2_along, mask, scale2, mean2)
        if NUM_MAPS >= 4:
            value += _normalised_tap(m3_base, src, s3_along, mask, scale3, mean3)
        acc += tap * value
    out = out_ptr + batch * so_batch + along.to(tl.int64)[:, None] * so_along
    tl.store(out + across[None, :] * so_across, acc, mask=mask)


@functools.lru_cache(maxsize=32)
def _device_taps(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    return gaussian_taps(sigma, truncate).to(device)


def _launch_axis(
    maps: Sequence[torch.Tensor],
    out: torch.Tensor,
    taps: torch.Tensor,
    axis: int,
    scale_means: Sequence[tuple[float, float]] = (IDENTITY,),
) -> None:
    """Blur ``sum_i scale_i * (maps[i] - mean_i)`` ((B, H, W) each) along ``axis`` into ``out``."""
    across_axis = 3 - axis
    n_along, n_across = out.shape[axis], out.shape[across_axis]
    # Unused slots repeat the first map; NUM_MAPS keeps the kernel from reading them.
    slots = [*maps, *[maps[0]] * (MAX_MAPS - len(maps))]
    affines = [*scale_means, *[IDENTITY] * (MAX_MAPS - len(maps))]

    def strides(t: torch.Tensor) -> tuple[int, int, int]:
        return t.stride(0), t.stride(axis), t.stride(across_axis)

    grid = lambda meta: (  # noqa: E731
        triton.cdiv(n_along, meta["BLOCK_ALONG"]),
        triton.cdiv(n_across, meta["BLOCK_ACROSS"]),
        out.shape[0],
    )
    _blur_axis_kernel[grid](
        *slots,
        taps,
        out,
        n_along,
        n_across,
        taps.numel(),
        size_bucket(out.shape[0]),
        *(s for t in slots for s in strides(t)),
        *strides(out),
        *(v for pair in affines for v in pair),
        NUM_MAPS=len(maps),
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
    check_no_autograd("gaussian_blur_triton", x)
    gaussian_taps(float(sigma), float(truncate))  # argument errors before device errors
    device = check_device(x=x)
    taps = _device_taps(float(sigma), float(truncate), device)
    across_h = torch.empty(x.shape, dtype=torch.float32, device=device)
    out = torch.empty_like(across_h)
    if x.shape[0] == 0:
        return out
    with on_device(device):
        _launch_axis([x], across_h, taps, axis=1)
        _launch_axis([across_h], out, taps, axis=2)
    return out


def normalize_merge_blur_triton(
    maps: Sequence[torch.Tensor], affines: Sequence[Affine], sigma: float = 4.0
) -> torch.Tensor:
    """Triton version of :func:`kernels.blur.normalize_merge_blur_reference` (no autograd).

    Args:
        maps: 1 to 4 branch maps, each (B, H, W) of one shape, any strides, float16 /
            bfloat16 / float32 (they may differ).
        affines: one ``(weight, mean, std)`` per map (validation mean and std of that branch).
        sigma: Gaussian σ in pixels.

    Returns:
        (B, H, W) float32 ``blur(sum_i weight_i * (maps[i] - mean_i) / std_i)``.
    """
    checked = check_merge_inputs(maps, affines)
    for i, x in enumerate(maps):
        check_float_tensor(f"maps[{i}]", x, 3)
    check_no_autograd("normalize_merge_blur_triton", *maps)
    gaussian_taps(float(sigma))  # argument errors before device errors
    device = check_device(**{f"maps[{i}]": x for i, x in enumerate(maps)})
    taps = _device_taps(float(sigma), 4.0, device)
    scale_means = [(weight / std, mean) for weight, mean, std in checked]

    merged_h = torch.empty(maps[0].shape, dtype=torch.float32, device=device)
    out = torch.empty_like(merged_h)
    if maps[0].shape[0] == 0:
        return out
    with on_device(device):
        _launch_axis(maps, merged_h, taps, 1, scale_means)
        _launch_axis([merged_h], out, taps, axis=2)
    return out
