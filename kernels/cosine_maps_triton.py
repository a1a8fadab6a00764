"""Triton logical map: per-level 1 − cosine, bilinear upsampling and the sum over levels.

Two stages, chosen so every feature element is read from memory exactly once:

1. One launch per level reads encoder and decoder features at native resolution, channel block
   by channel block, and writes the (B, h, w) map ``1 − cos`` into one float32 buffer shared by
   all levels. Cosine is computed before upsampling, as in the reference; fusing it into the
   upsampling instead would re-read every feature vector for each of the ~(H/h)² output pixels
   that interpolate from it (16²–64² times at 256 px), so the features would dominate traffic.
2. One launch for all levels: each output pixel gathers its four neighbours from every level's
   small map (a few KiB to L2 per image, C times smaller than the features) and writes the sum.
   The output, the largest tensor here, is written once and never read back.

Per-level sizes and scales live in small device tables cached per shape, so the second stage
handles any number of levels with one kernel and no per-call host-to-device copies.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.triton_support import (
    check_device,
    check_finite,
    check_float_tensor,
    check_no_autograd,
    on_device,
    pick_configs,
    size_bucket,
)

LEVEL_GPU_CONFIGS = [
    triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=w)
    for bp, bc, w in [
        (32, 64, 4),
        (64, 32, 4),
        (64, 64, 4),
        (128, 16, 4),
        (128, 32, 4),
        (256, 16, 8),
    ]
]
LEVEL_INTERPRETER_CONFIG = triton.Config({"BLOCK_P": 128, "BLOCK_C": 64})
UPSAMPLE_GPU_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(256, 4), (512, 4), (1024, 8)]
]
UPSAMPLE_INTERPRETER_CONFIG = triton.Config({"BLOCK": 1024})


@triton.autotune(
    configs=pick_configs(LEVEL_GPU_CONFIGS, LEVEL_INTERPRETER_CONFIG),
    key=["C", "HW", "batch_bucket"],
    cache_results=True,
)
@triton.jit
def _cosine_level_kernel(
    enc_ptr,
    dec_ptr,
    out_ptr,
    C,
    HW,
    W,
    eps,
    batch_bucket,  # autotune key only: the batch (grid axis 1) changes the best tiles
    se_b,
    se_c,
    se_h,
    se_w,
    sd_b,
    sd_c,
    sd_h,
    sd_w,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, p] = 1 − cos(enc[b, :, p], dec[b, :, p]) for a block of pixels p of image b."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = pix < HW
    y = (pix // W).to(tl.int64)
    x = (pix % W).to(tl.int64)
    enc_pix = enc_ptr + b * se_b + y * se_h + x * se_w
    dec_pix = dec_ptr + b * sd_b + y * sd_h + x * sd_w
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)

    # Element-wise accumulators; reduced over channels once, after the loop.
    dot = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    enc_sq = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    dec_sq = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + offs_c
        mask = (cs < C)[:, None] & pix_ok[None, :]
        e = tl.load(enc_pix[None, :] + cs[:, None] * se_c, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dec_pix[None, :] + cs[:, None] * sd_c, mask=mask, other=0.0).to(tl.float32)
        dot += e * d
        enc_sq += e * e
        dec_sq += d * d
    enc_norm = tl.maximum(tl.sqrt(tl.sum(enc_sq, axis=0)), eps)
    dec_norm = tl.maximum(tl.sqrt(tl.sum(dec_sq, axis=0)), eps)
    cos = tl.sum(dot, axis=0) / (enc_norm * dec_norm)
    tl.store(out_ptr + b * HW + pix, 1.0 - cos, mask=pix_ok)


@triton.autotune(
    configs=pick_configs(UPSAMPLE_GPU_CONFIGS, UPSAMPLE_INTERPRETER_CONFIG),
    key=["H", "W", "num_levels", "batch_bucket", "ALIGN_CORNERS"],
    cache_results=True,
)
@triton.jit
def _upsample_sum_kernel(
    maps_ptr,
    layout_ptr,
    scales_ptr,
    out_ptr,
    num_levels,
    H,
    W,
    batch_bucket,  # autotune key only, as above
    ALIGN_CORNERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[b, Y, X] = Σ_levels bilinear(map_l[b], Y, X), following F.interpolate's arithmetic.

    ``layout`` holds (offset, h, w) per level (int64), ``scales`` (scale_y, scale_x) (float32).
    """
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pix_ok = pix < H * W
    oy = (pix // W).to(tl.float32)
    ox = (pix % W).to(tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for level in range(num_levels):
        offset = tl.load(layout_ptr + 3 * level)
        h = tl.load(layout_ptr + 3 * level + 1)
        w = tl.load(layout_ptr + 3 * level + 2)
        scale_y = tl.load(scales_ptr + 2 * level)
        scale_x = tl.load(scales_ptr + 2 * level + 1)
        if ALIGN_CORNERS:
            sy = oy * scale_y
            sx = ox * scale_x
        else:
            sy = tl.maximum((oy + 0.5) * scale_y - 0.5, 0.0)
            sx = tl.maximum((ox + 0.5) * scale_x - 0.5, 0.0)
        # Source coordinates are >= 0, so truncation is floor.
        y0 = tl.minimum(sy.to(tl.int64), h - 1)
        x0 = tl.minimum(sx.to(tl.int64), w - 1)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        plane = maps_ptr + offset + b * h * w
        v00 = tl.load(plane + y0 * w + x0, mask=pix_ok, other=0.0)
        v01 = tl.load(plane + y0 * w + x1, mask=pix_ok, other=0.0)
        v10 = tl.load(plane + y1 * w + x0, mask=pix_ok, other=0.0)
        v11 = tl.load(plane + y1 * w + x1, mask=pix_ok, other=0.0)
        top = (1.0 - lx) * v00 + lx * v01
        bottom = (1.0 - lx) * v10 + lx * v11
        total += (1.0 - ly) * top + ly * bottom
    tl.store(out_ptr + b * H * W + pix, total, mask=pix_ok)


def _interp_scale(n_in: int, n_out: int, align_corners: bool) -> float:
    """Source-per-output step of F.interpolate(mode="bilinear") for an explicit size."""
    if align_corners:
        return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return n_in / n_out


@functools.lru_cache(maxsize=64)
def _level_tables(
    level_sizes: tuple[tuple[int, int], ...],
    batch: int,
    out_size: tuple[int, int],
    align_corners: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(layout (L, 3) int64, scales (L, 2) float32) on ``device``, and each level's offset."""
    offsets, layout, scales = [], [], []
    offset = 0
    for h, w in level_sizes:
        offsets.append(offset)
        layout.append((offset, h, w))
        scales.append(
            (
                _interp_scale(h, out_size[0], align_corners),
                _interp_scale(w, out_size[1], align_corners),
            )
        )
        offset += batch * h * w
    return (
        torch.tensor(layout, dtype=torch.int64, device=device),
        torch.tensor(scales, dtype=torch.float32, device=device),
        [*offsets, offset],
    )


def _check_levels(
    encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    if len(encoder) != len(decoder) or not encoder:
        raise ValueError("encoder and decoder must hold the same, non-zero number of levels")
    tensors = {}
    for i, (e, d) in enumerate(zip(encoder, decoder, strict=True)):
        check_float_tensor(f"encoder[{i}]", e, 4)
        check_float_tensor(f"decoder[{i}]", d, 4)
        if e.shape != d.shape:
            raise ValueError(
                f"level {i} shapes differ: encoder {tuple(e.shape)} vs decoder {tuple(d.shape)}"
            )
        if e.shape[0] != encoder[0].shape[0]:
            raise ValueError(
                f"level {i} has batch {e.shape[0]} but level 0 has batch {encoder[0].shape[0]}"
            )
        if min(e.shape[1:]) == 0:
            raise ValueError(f"level {i} has an empty channel or spatial dim: {tuple(e.shape)}")
        tensors[f"encoder[{i}]"] = e
        tensors[f"decoder[{i}]"] = d
    check_no_autograd("cosine_maps_triton", *tensors.values())
    return tensors


def cosine_maps_triton(
    encoder: Sequence[torch.Tensor],
    decoder: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    align_corners: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Triton version of :func:`kernels.cosine_maps.cosine_maps_reference` (no autograd).

    Args:
        encoder, decoder: per level, (B, C_l, h_l, w_l) features of equal shape; any strides
            (channels-last included) and any of float16 / bfloat16 / float32.
        out_size: (H, W) of the output map.
        align_corners: bilinear upsampling convention, as in ``F.interpolate``.
        eps: each feature norm is clamped to at least ``eps`` before dividing.

    Returns:
        (B, H, W) float32 map.
    """
    tensors = _check_levels(encoder, decoder)
    if len(out_size) != 2 or any(int(s) != s or s <= 0 for s in out_size):
        raise ValueError(f"out_size must be two positive ints, got {out_size}")
    if check_finite("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    device = check_device(**tensors)  # argument errors come before device errors
    out_h, out_w = int(out_size[0]), int(out_size[1])
    batch = encoder[0].shape[0]
    out = torch.empty((batch, out_h, out_w), dtype=torch.float32, device=device)
    if batch == 0:
        return out

    sizes = tuple((e.shape[2], e.shape[3]) for e in encoder)
    layout, scales, offsets = _level_tables(sizes, batch, (out_h, out_w), align_corners, device)
    maps = torch.empty(offsets[-1], dtype=torch.float32, device=device)
    with on_device(device):
        for e, d, start in zip(encoder, decoder, offsets):
            hw = e.shape[2] * e.shape[3]
            _cosine_level_kernel[lambda meta, hw=hw: (triton.cdiv(hw, meta["BLOCK_P"]), batch)](
                e,
                d,
                maps[start:],
                e.shape[1],
                hw,
                e.shape[3],
                eps,
                size_bucket(batch),
                *e.stride(),
                *d.stride(),
            )
        _upsample_sum_kernel[lambda meta: (triton.cdiv(out_h * out_w, meta["BLOCK"]), batch)](
            maps,
            layout,
            scales,
            out,
            len(encoder),
            out_h,
            out_w,
            size_bucket(batch),
            ALIGN_CORNERS=align_corners,
        )
    return out
