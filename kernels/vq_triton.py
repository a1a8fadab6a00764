"""Triton VQ nearest-codeword search: distances, argmin and gather fused in one kernel.

Each program takes ``BLOCK_N`` vectors, computes ``||c||² − 2 x·c`` against ``BLOCK_K`` codewords
at a time with an IEEE-fp32 ``tl.dot`` (``||x||²`` is the same for every codeword, so it does not
change the argmin), keeps a running minimum across codeword blocks, then copies the chosen rows.
With the paper's K = 16 the codebook fits one block and every vector is read exactly once; the
work is memory-bound, so exact fp32 products cost nothing and keep the argmin equal to the
reference's apart from near-ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_support import (
    MIN_DOT_TILE,
    check_device,
    check_float_tensor,
    check_no_autograd,
    on_device,
    pick_configs,
    size_bucket,
)

# Codeword block: the paper's K = 16 fits one; larger codebooks loop over blocks of 64.
MAX_BLOCK_K = 64

_CONFIGS = pick_configs(
    gpu=[
        triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bd, w, s in [
            (32, 64, 4, 2),
            (64, 32, 4, 3),
            (64, 64, 4, 2),
            (128, 32, 4, 3),
            (128, 64, 8, 2),
        ]
    ],
    interpreter=triton.Config({"BLOCK_N": 64, "BLOCK_D": 32}),
    dot_tiles=("BLOCK_N", "BLOCK_D"),
)


@triton.autotune(configs=_CONFIGS, key=["K", "D", "n_bucket"], cache_results=True)
@triton.jit
def _vq_nearest_kernel(
    x_ptr,
    code_ptr,
    idx_ptr,
    out_ptr,
    N,
    K,
    D,
    n_bucket,
    stride_xn,
    stride_xd,
    stride_ck,
    stride_cd,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        code_sq = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            d_ok = ds < D
            x = tl.load(
                x_ptr + rows64[:, None] * stride_xn + ds[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            c = tl.load(
                code_ptr + ks[:, None] * stride_ck + ds[None, :] * stride_cd,
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            dots = tl.dot(x, tl.trans(c), dots, input_precision="ieee")
            code_sq += tl.sum(c * c, axis=1)
        dist = tl.where(k_ok[None, :], code_sq[None, :] - 2.0 * dots, float("inf"))
        block_min = tl.min(dist, axis=1)
        block_arg = tl.argmin(dist, axis=1).to(tl.int32) + k0
        # Strict "<": an earlier block keeps ties, as argmin over all K would.
        better = block_min < best
        best = tl.where(better, block_min, best)
        best_idx = tl.where(better, block_arg, best_idx)

    tl.store(idx_ptr + rows64, best_idx.to(tl.int64), mask=row_ok)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        mask = row_ok[:, None] & (ds < D)[None, :]
        chosen = tl.load(
            code_ptr + best_idx[:, None] * stride_ck + ds[None, :] * stride_cd,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        tl.store(
            out_ptr + rows64[:, None] * D + ds[None, :],
            chosen.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


def vq_nearest_triton(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`kernels.vq.vq_nearest_reference` (same result; no autograd).

    Args:
        x: (N, D) vectors; any strides.
        codebook: (K, D) entries; any strides.

    Returns:
        ``(indices, quantized)``: (N,) int64 and (N, D) contiguous in ``codebook``'s dtype.
    """
    check_float_tensor("x", x, 2)
    check_float_tensor("codebook", codebook, 2)
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"x has dim {x.shape[1]} but the codebook entries have dim {codebook.shape[1]}"
        )
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"the codebook must be non-empty, got shape {tuple(codebook.shape)}")
    check_no_autograd("vq_nearest_triton", x, codebook)
    device = check_device(x=x, codebook=codebook)

    n, d = x.shape
    k = codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=device)
    quantized = torch.empty((n, d), dtype=codebook.dtype, device=device)
    if n == 0:
        return indices, quantized
    block_k = min(MAX_BLOCK_K, max(MIN_DOT_TILE, triton.next_power_of_2(k)))
    with on_device(device):
        _vq_nearest_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            x,
            codebook,
            indices,
            quantized,
            n,
            k,
            d,
            size_bucket(n),
            x.stride(0),
            x.stride(1),
            codebook.stride(0),
            codebook.stride(1),
            BLOCK_K=block_k,
        )
    return indices, quantized
