"""Triton structural kNN: nearest memory-bank row for every query, fused distance and min.

The bank is cut into ``splits`` contiguous ranges so that even 1024 queries fill a large GPU.
A program of the main kernel owns ``BLOCK_Q`` queries and one range: for each ``BLOCK_M`` bank
tile it accumulates ``q·b`` over D with ``tl.dot`` (FP32 accumulation), forms ``||b||² − 2 q·b``
with the precomputed bank norms and keeps a running min and argmin, so the Q × M distance
matrix never exists. A second, tiny kernel takes the min over ranges, adds ``||q||²`` (it does
not change the argmin), clamps at 0 and takes the square root. Memory: O(Q · splits + M).

Operands are multiplied in their common dtype: fp16 and bf16 on the tensor cores, fp32 as
"tf32x3" (three TF32 products, close to fp32 accuracy; plain TF32 would shift distances by
~1e-3 relative, enough to reorder near neighbours). Mixed dtypes are promoted inside the kernel,
so a large bank is never copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreter_enabled
from kernels.knn_args import resolve_bank_sq
from kernels.triton_support import (
    check_device,
    check_float_tensor,
    check_no_autograd,
    multiprocessor_count,
    on_device,
    pick_configs,
    size_bucket,
)

GPU_CONFIGS = [
    triton.Config({"BLOCK_Q": q, "BLOCK_M": m, "BLOCK_D": d}, num_warps=w, num_stages=s)
    for q, m, d, w, s in [
        (64, 64, 64, 4, 3),
        (64, 128, 32, 4, 4),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 4, 3),
        (128, 128, 32, 8, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 3),
    ]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_Q": 32, "BLOCK_M": 64, "BLOCK_D": 32})
# Every bank range is a multiple of the largest BLOCK_M, so tiles never straddle two ranges.
RANGE_ALIGN = 256
# Programs to aim for per streaming multiprocessor when choosing the number of bank ranges.
PROGRAMS_PER_SM = 2
REDUCE_BLOCK_Q = 64
REDUCE_BLOCK_D = 64

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.autotune(
    configs=pick_configs(
        GPU_CONFIGS, INTERPRETER_CONFIG, dot_tiles=("BLOCK_Q", "BLOCK_M", "BLOCK_D")
    ),
    key=["D", "q_bucket", "m_bucket", "range_len"],
    cache_results=True,
)
@triton.jit
def _knn_partial_kernel(
    q_ptr,
    bank_ptr,
    bank_sq_ptr,
    part_score_ptr,
    part_idx_ptr,
    Q,
    M,
    D,
    range_len,
    q_bucket,
    m_bucket,
    stride_qn,
    stride_qd,
    stride_bm,
    stride_bd,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """part_score[r, q], part_idx[r, q] = min, argmin over bank range r of ||b||² − 2 q·b."""
    bank_range = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < Q
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qn
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_start = bank_range * range_len
    m_end = tl.minimum(m_start + range_len, M)

    best = tl.full([BLOCK_Q], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_Q], tl.int32)
    for m0 in range(m_start, m_end, BLOCK_M):
        cols = m0 + offs_m
        col_ok = cols < m_end
        b_rows = bank_ptr + cols.to(tl.int64)[:, None] * stride_bm
        dots = tl.zeros([BLOCK_Q, BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            d_ok = (ds < D)[None, :]
            q = tl.load(q_rows + ds[None, :] * stride_qd, mask=row_ok[:, None] & d_ok, other=0.0)
            b = tl.load(b_rows + ds[None, :] * stride_bd, mask=col_ok[:, None] & d_ok, other=0.0)
            dots = tl.dot(
                q.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)), dots, input_precision=PRECISION
            )
        bank_sq = tl.load(bank_sq_ptr + cols, mask=col_ok, other=float("inf"))
        score = bank_sq[None, :] - 2.0 * dots
        tile_min = tl.min(score, axis=1)
        tile_arg = tl.argmin(score, axis=1).to(tl.int32) + m0
        # Strict "<": earlier tiles keep ties, so the lowest index wins as in torch's min.
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg, best_idx)
    out = bank_range.to(tl.int64) * Q + rows
    tl.store(part_score_ptr + out, best, mask=row_ok)
    tl.store(part_idx_ptr + out, best_idx, mask=row_ok)


@triton.jit
def _knn_finish_kernel(
    part_score_ptr,
    part_idx_ptr,
    q_ptr,
    dist_ptr,
    idx_ptr,
    Q,
    D,
    num_ranges,
    stride_qn,
    stride_qd,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dist[q] = sqrt(max(||q||² + min over ranges, 0)), idx[q] = its bank index (int64)."""
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < Q
    best = tl.full([BLOCK_Q], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_Q], tl.int32)
    for r in range(num_ranges):
        score = tl.load(part_score_ptr + r * Q + rows, mask=row_ok, other=float("inf"))
        idx = tl.load(part_idx_ptr + r * Q + rows, mask=row_ok, other=0)
        better = score < best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
    q_sq = tl.zeros([BLOCK_Q], tl.float32)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qn
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(
            q_rows + ds[None, :] * stride_qd, mask=row_ok[:, None] & (ds < D)[None, :], other=0.0
        ).to(tl.float32)
        q_sq += tl.sum(q * q, axis=1)
    tl.store(dist_ptr + rows, tl.sqrt(tl.maximum(q_sq + best, 0.0)), mask=row_ok)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)


def _dot_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Common operand dtype; the interpreter cannot compute on bf16, so it gets fp32."""
    common = a if a == b else torch.float32
    if interpreter_enabled() and common == torch.bfloat16:
        return torch.float32
    return common


def _num_ranges(q_tiles: int, m: int, device: torch.device) -> int:
    """Bank ranges needed for about PROGRAMS_PER_SM programs per SM; 1 on CPU."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * multiprocessor_count(device), q_tiles)
    return max(1, min(wanted, triton.cdiv(m, RANGE_ALIGN)))


def knn_min_triton(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`kernels.knn.knn_min_reference` (no autograd).

    Args:
        queries: (Q, D); bank: (M, D); float16 / bfloat16 / float32, any strides.
        bank_sq: optional (M,) float32 :func:`kernels.knn_args.bank_sq_norms` of ``bank``,
            precomputed once per bank; computed here when None.
        splits: number of bank ranges searched in parallel; None fills the GPU.

    Returns:
        ``(dist, idx)``: (Q,) float32 L2 distances and (Q,) int64 indices of the nearest row.
    """
    check_float_tensor("queries", queries, 2)
    check_float_tensor("bank", bank, 2)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"expected (Q, D) and (M, D), got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if bank.shape[1] == 0:
        raise ValueError("the feature dim D is 0")
    check_no_autograd("knn_min_triton", queries, bank)
    n_q, d = queries.shape
    m = bank.shape[0]
    bank_sq = resolve_bank_sq(bank, bank_sq)
    if splits is not None and not (isinstance(splits, int) and 1 <= splits <= m):
        raise ValueError(f"splits must be an int in [1, M={m}], got {splits}")
    device = check_device(queries=queries, bank=bank)  # argument errors come first
    dist = torch.empty(n_q, dtype=torch.float32, device=device)
    idx = torch.empty(n_q, dtype=torch.int64, device=device)
    if n_q == 0:
        return dist, idx

    smallest_block_q = min(c.kwargs["BLOCK_Q"] for c in _knn_partial_kernel.configs)
    if splits is None:
        splits = _num_ranges(triton.cdiv(n_q, smallest_block_q), m, device)
    range_len = triton.cdiv(triton.cdiv(m, splits), RANGE_ALIGN) * RANGE_ALIGN
    num_ranges = triton.cdiv(m, range_len)
    part_score = torch.empty((num_ranges, n_q), dtype=torch.float32, device=device)
    part_idx = torch.empty((num_ranges, n_q), dtype=torch.int32, device=device)
    dot_dtype = _dot_dtype(queries.dtype, bank.dtype)

    with on_device(device):
        _knn_partial_kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_Q"]), num_ranges)](
            queries,
            bank,
            bank_sq.contiguous(),
            part_score,
            part_idx,
            n_q,
            m,
            d,
            range_len,
            size_bucket(n_q),
            size_bucket(m),
            queries.stride(0),
            queries.stride(1),
            bank.stride(0),
            bank.stride(1),
            DOT_DTYPE=_DOT_DTYPES[dot_dtype],
            PRECISION="tf32x3" if dot_dtype == torch.float32 else "tf32",
        )
        _knn_finish_kernel[(triton.cdiv(n_q, REDUCE_BLOCK_Q),)](
            part_score,
            part_idx,
            queries,
            dist,
            idx,
            n_q,
            d,
            num_ranges,
            queries.stride(0),
            queries.stride(1),
            BLOCK_Q=REDUCE_BLOCK_Q,
            BLOCK_D=REDUCE_BLOCK_D,
        )
    return dist, idx
