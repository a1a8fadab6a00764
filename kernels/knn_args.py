"""Memory-bank norms shared by the kNN reference (:mod:`kernels.knn`), its Triton version
(:mod:`kernels.knn_triton`) and the engine: a leaf module, so neither kernel module imports the
other for these."""

from __future__ import annotations

import torch


def bank_sq_norms(bank: torch.Tensor) -> torch.Tensor:
    """(M,) float32 squared L2 norms of the (M, D) bank rows: compute once per bank."""
    return bank.float().pow(2).sum(1)


def resolve_bank_sq(bank: torch.Tensor, bank_sq: torch.Tensor | None) -> torch.Tensor:
    """``bank_sq`` checked against ``bank``, or computed from it when None."""
    if bank_sq is None:
        return bank_sq_norms(bank)
    m = bank.shape[0]
    if bank_sq.shape != (m,) or bank_sq.dtype != torch.float32 or bank_sq.device != bank.device:
        raise ValueError(
            f"bank_sq must be ({m},) float32 on {bank.device}, got {tuple(bank_sq.shape)} "
            f"{bank_sq.dtype} on {bank_sq.device}"
        )
    return bank_sq
