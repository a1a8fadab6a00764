"""Approximate greedy k-center coreset of a patch memory bank (PatchCore's subsampling).

The greedy k-center rule repeatedly picks the point farthest from everything picked so far. It
runs on a seeded Gaussian random projection of the features (Johnson-Lindenstrauss: distances are
roughly preserved at a fraction of the cost) and keeps only a running vector of every point's
distance to its nearest picked point, so no N x N distance matrix is ever built.

Start (PatchCore's approximate variant): ``num_starts`` seeded random points initialise the
running vector with each point's mean distance to them; the first pick is its argmax. The start
points are not themselves added. The same ``seed`` gives the same indices on the same device.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

__all__ = ["coreset_size", "greedy_coreset", "random_projection"]


def coreset_size(n: int, ratio: float | None, count: int | None) -> int:
    """Number of points to keep out of ``n``: exactly one of ``ratio`` (0, 1] or ``count``."""
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio or count")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= n:
            raise ValueError(f"count must be an int in [1, {n}], got {count!r}")
        return count
    if not (isinstance(ratio, int | float) and 0 < ratio <= 1 and math.isfinite(ratio)):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return max(1, int(n * ratio))


def random_projection(
    features: torch.Tensor,
    projection_dim: int,
    generator: torch.Generator,
    device: torch.device,
    batch: int = 16384,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, D) features -> (N, projection_dim) float32 on ``device``, projected ``batch`` rows at a time.

    The matrix is i.i.d. N(0, 1/projection_dim) (drawn on CPU from ``generator`` so that the seed
    means the same matrix on every device). With ``projection_dim >= D`` the features are used as
    they are (a projection could only add noise).

    ``basis``: when the features are coordinates ``x`` of vectors ``x @ basis.T`` of a larger
    space (a (D_full, D) orthonormal basis, see ``PatchFeatures``), the matrix is drawn in that
    space and mapped onto the basis, so the projection, and so the coreset, is the one the
    full-space vectors would get.
    """
    n, d = features.shape
    if basis is not None and (basis.dim() != 2 or basis.shape[1] != d):
        raise ValueError(f"basis must be (D_full, {d}), got {tuple(basis.shape)}")
    full = d if basis is None else basis.shape[0]
    if projection_dim >= full:
        return features.to(device=device, dtype=torch.float32, copy=True)
    matrix = torch.randn(full, projection_dim, generator=generator) / math.sqrt(projection_dim)
    if basis is not None:
        matrix = basis.t().double().cpu() @ matrix.double()
    matrix = matrix.float().to(device)
    out = torch.empty(n, projection_dim, dtype=torch.float32, device=device)
    for start in range(0, n, batch):
        out[start : start + batch] = features[start : start + batch].to(device).float() @ matrix
    return out


def greedy_coreset(
    features: torch.Tensor,
    ratio: float | None = None,
    count: int | None = None,
    projection_dim: int = 128,
    seed: int = 0,
    num_starts: int = 10,
    device: str | torch.device | None = None,
    progress: bool = True,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of an approximate greedy k-center coreset of ``features``.

    Args:
        features: (N, D) memory bank, any float dtype, on any device.
        ratio: fraction of points to keep (``max(1, int(N * ratio))``), or
        count: number of points to keep (give exactly one of the two).
        projection_dim: random projection size (PatchCore: 128).
        seed: seeds the projection and the start points.
        num_starts: random start points (PatchCore: 10), see the module docstring.
        device: where to compute (default: the device of ``features``).
        progress: show a tqdm bar over the picks.
        basis: the (D_full, D) orthonormal basis ``features`` are coordinates in, if any (see
            :func:`random_projection`); the picks are then those of the full-space vectors.

    Returns:
        (K,) int64 distinct indices into ``features`` in pick order, on ``features.device``.

    Memory is the (N, projection_dim) projection plus O(N) running distances; features are moved
    to ``device`` in row batches only.
    """
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must be a non-empty (N, D) tensor, got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if (
        isinstance(projection_dim, bool)
        or not isinstance(projection_dim, int)
        or projection_dim < 1
    ):
        raise ValueError(f"projection_dim must be a positive int, got {projection_dim!r}")
    if isinstance(num_starts, bool) or not isinstance(num_starts, int) or num_starts < 1:
        raise ValueError(f"num_starts must be a positive int, got {num_starts!r}")
    n = features.shape[0]
    k = coreset_size(n, ratio, count)
    device = torch.device(device) if device is not None else features.device
    generator = torch.Generator().manual_seed(seed)

    projected = random_projection(features, projection_dim, generator, device, basis=basis)
    if not torch.isfinite(projected).all():
        raise ValueError("features contain NaN or infinite values")
    sq_norms = projected.pow(2).sum(1)
    scaled = projected.mul_(-2.0)  # in place: -2x is all the loop needs, saving one pass per pick
    buffer = torch.empty(n, dtype=torch.float32, device=device)

    def sq_distances_to(index: int | torch.Tensor) -> torch.Tensor:
        """(N,) squared Euclidean distance of every projected point to point ``index`` (in buffer)."""
        center = scaled[index] * -0.5
        torch.mv(scaled, center, out=buffer)
        return buffer.add_(sq_norms).add_(sq_norms[index]).clamp_min_(0)

    # Greedy k-center only compares distances, so the loop works on squared ones; the start
    # (a mean of distances, as in PatchCore) is computed on true distances and then squared.
    starts = torch.randperm(n, generator=generator)[: min(num_starts, n)].tolist()
    nearest = torch.zeros(n, dtype=torch.float32, device=device)
    for start in starts:
        nearest += sq_distances_to(start).sqrt_()
    nearest.div_(len(starts)).pow_(2)

    picks = torch.empty(k, dtype=torch.int64, device=device)
    for step in tqdm(range(k), desc="coreset", unit="pt", disable=not progress):
        pick = torch.argmax(nearest)
        picks[step] = pick
        torch.minimum(nearest, sq_distances_to(pick), out=nearest)
        # Picked points get -1 so that exact duplicates (distance 0) can never be picked twice.
        nearest[pick] = -1.0
    return picks.to(features.device)
