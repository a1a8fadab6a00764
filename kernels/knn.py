"""Structural kNN: distance from every query patch to its nearest memory-bank entry."""

from __future__ import annotations

import torch

from kernels.dispatch import check_no_autograd, use_triton
from kernels.knn_args import resolve_bank_sq
from kernels.ops import knn_min_op


def knn_min_reference(
    queries: torch.Tensor,
    bank: torch.Tensor,
    chunk: int = 4096,
    bank_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, the nearest bank row for every query row.

    Args:
        queries: (Q, D); bank: (M, D). Any float dtype; accumulation is float32.
        chunk: queries processed per step, bounding memory to ``chunk * M`` distances.
        bank_sq: optional precomputed :func:`bank_sq_norms` of ``bank``.

    Returns:
        ``(dist, idx)``: (Q,) float32 L2 distances (not squared) and (Q,) int64 indices.
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"expected (Q, D) and (M, D), got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b = bank.float()
    b_sq = resolve_bank_sq(bank, bank_sq)
    dists, idxs = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].float()
        # ||q||^2 is the same for every bank row: add it after the min, so the (chunk, M)
        # matrix is written once (one addmm) instead of three times.
        partial = torch.addmm(b_sq[None, :], q, b.t(), alpha=-2.0)
        d2_min, i = partial.min(dim=1)
        dists.append((d2_min + (q * q).sum(1)).clamp_min(0).sqrt())
        idxs.append(i)
    if not dists:
        return queries.new_empty(0, dtype=torch.float32), queries.new_empty(0, dtype=torch.int64)
    return torch.cat(dists), torch.cat(idxs)


def knn_min(
    queries: torch.Tensor,
    bank: torch.Tensor,
    backend: str = "auto",
    bank_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher for :func:`knn_min_reference`; pass ``bank_sq`` to reuse the bank norms. The
    Triton path is the opaque operator ``torch.ops.npgmf.knn_min``."""
    if use_triton(backend, queries, bank):
        check_no_autograd("knn_min", queries, bank)
        return knn_min_op(queries, bank, bank_sq)
    return knn_min_reference(queries, bank, bank_sq=bank_sq)
