"""How crowded the memory bank is around each of its rows, to weigh a patch's kNN distance.

PatchCore scores a patch by its distance to the nearest bank row. Where the training images
show a part in few poses, the bank is sparse and a normal patch still lands far from its nearest
row; where they show it often, the bank is dense and a small defect lands close. Dividing the
distance by the nearest row's own distance to its k-th nearest other row (the local-outlier
idea: distances in units of the neighbourhood's spacing) puts both on one scale
(docs/ACCURACY.md, ablation 37).
"""

from __future__ import annotations

import torch

from kernels.knn_args import bank_sq_norms

__all__ = ["kth_neighbour_distances", "row_scales"]

# A row's spacing is floored at this fraction of the median spacing: duplicate rows (spacing 0)
# must not give a patch near them an unbounded score.
MIN_SPACING = 0.05


def kth_neighbour_distances(bank: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """(M,) float32: each row's Euclidean distance to its k-th nearest *other* row of the
    (M, D) ``bank`` (exact; row blocks of ``chunk``, so memory is O(chunk x M))."""
    m = bank.shape[0]
    if bank.dim() != 2 or m < 2:
        raise ValueError(f"the bank must be (M >= 2, D), got {tuple(bank.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < m:
        raise ValueError(f"k must be an int in [1, {m - 1}] for a bank of {m} rows, got {k!r}")
    rows = bank.float()
    sq = bank_sq_norms(rows)
    out = torch.empty(m, dtype=torch.float32, device=bank.device)
    for start in range(0, m, chunk):
        block = rows[start : start + chunk]
        # A row's own norm is the same in every column: added after the top-k (as in
        # kernels.knn's reference), so the (chunk, M) matrix is written once.
        d2 = torch.addmm(sq[None, :], block, rows.T, alpha=-2.0)
        own = torch.arange(block.shape[0], device=bank.device)
        d2[own, own + start] = torch.inf  # a row is not its own neighbour
        kth = d2.topk(k, dim=1, largest=False).values[:, -1]
        out[start : start + chunk] = kth + sq[start : start + chunk]
    return out.clamp_min_(0.0).sqrt_()


def row_scales(bank: torch.Tensor, k: int) -> torch.Tensor:
    """(M,) float32 factors for the distances to each bank row: the median k-th-neighbour
    spacing over the row's own (floored at :data:`MIN_SPACING` of the median), so a patch at
    the typical spacing from a typical row keeps its distance."""
    spacing = kth_neighbour_distances(bank, k)
    median = spacing.median()
    if not median > 0:
        raise ValueError(
            f"the bank's rows are mostly duplicates (median distance to the {k}-th neighbour "
            "is 0): structural.density_k cannot weigh them"
        )
    return median / spacing.clamp_min(MIN_SPACING * median)
