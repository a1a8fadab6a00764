"""Approximate greedy k-center coreset of a patch memory bank (PatchCore's subsampling).

The greedy k-center rule repeatedly picks the point farthest from everything picked so far. It
runs on a seeded Gaussian random projection of the features (Johnson-Lindenstrauss: distances are
roughly preserved at a fraction of the cost) and keeps only a running vector of every point's
distance to its nearest picked point, so no N x N distance matrix is ever built. Picks come in
blocks from a few candidate points, with one GEMM over all points per block
(:func:`_blocked_greedy`): the same picks as the one-pass-per-pick loop, 18.8x faster on the
real patch features of a LOCO-size category (docs/PERFORMANCE.md).

Start (PatchCore's approximate variant): ``num_starts`` seeded random points initialise the
running vector with each point's mean distance to them; the first pick is its argmax. The start
points are not themselves added. The same ``seed`` gives the same indices on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

__all__ = ["coreset_size", "gather_rows", "greedy_coreset", "random_projection", "reference_greedy"]


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
    features: torch.Tensor | Sequence[torch.Tensor],
    projection_dim: int,
    generator: torch.Generator,
    device: torch.device,
    batch: int = 16384,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, D) features -> (N, projection_dim) float32 on ``device``, projected ``batch`` rows at a time.
    ``features`` may be a sequence of (N_i, D) parts, taken as their concatenation (never built).

    The matrix is i.i.d. N(0, 1/projection_dim) (drawn on CPU from ``generator`` so that the seed
    means the same matrix on every device). With ``projection_dim >= D`` the features are used as
    they are (a projection could only add noise).

    ``basis``: when the features are coordinates ``x`` of vectors ``x @ basis.T`` of a larger
    space (a (D_full, D) orthonormal basis, see ``PatchFeatures``), the matrix is drawn in that
    space and mapped onto the basis, so the projection, and so the coreset, is the one the
    full-space vectors would get.
    """
    parts = _parts(features)
    n, d = sum(part.shape[0] for part in parts), parts[0].shape[1]
    if basis is not None and (basis.dim() != 2 or basis.shape[1] != d):
        raise ValueError(f"basis must be (D_full, {d}), got {tuple(basis.shape)}")
    full = d if basis is None else basis.shape[0]
    if projection_dim >= full:
        # cat always allocates: the result never aliases the caller's features
        return torch.cat([part.to(device=device, dtype=torch.float32) for part in parts])
    matrix = torch.randn(full, projection_dim, generator=generator) / math.sqrt(projection_dim)
    if basis is not None:
        matrix = basis.t().double().cpu() @ matrix.double()
    matrix = matrix.float().to(device)
    out = torch.empty(n, projection_dim, dtype=torch.float32, device=device)
    for start, rows in _row_batches(parts, batch):
        out[start : start + rows.shape[0]] = rows.to(device).float() @ matrix
    return out


def _row_batches(parts: list[torch.Tensor], batch: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of the parts' concatenation, ``batch`` rows at a time: the same
    batches, and so the same products, as one tensor would give (a batch that spans parts is
    copied together; nothing else is)."""
    ends = _part_ends(parts).tolist()
    total = ends[-1]
    for start in range(0, total, batch):
        stop, pieces, begin = min(start + batch, total), [], 0
        for part, end in zip(parts, ends, strict=True):
            lo, hi = max(start, begin), min(stop, end)
            if lo < hi:
                pieces.append(part[lo - begin : hi - begin])
            begin = end
        yield start, pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def gather_rows(parts: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (CPU indices into the concatenation of the (N_i, D) ``parts``, as
    :func:`greedy_coreset` returns them for parts), in that order, without the concatenation."""
    ends = _part_ends(parts)
    which = torch.searchsorted(ends, rows, right=True)
    out = torch.empty(len(rows), parts[0].shape[1], dtype=parts[0].dtype)
    for i, part in enumerate(parts):
        mine = which == i
        if mine.any():
            out[mine] = part[rows[mine] - (ends[i] - part.shape[0])]
    return out


def _part_ends(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(P,) int64: one past the last row of each part in the parts' concatenation."""
    return torch.tensor([p.shape[0] for p in parts]).cumsum(0)


def _parts(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``features`` as a list of (N_i, D) parts (one part for a tensor), checked."""
    parts = [features] if isinstance(features, torch.Tensor) else list(features)
    if not parts:
        raise ValueError("features must be a non-empty (N, D) tensor, got no parts")
    width = parts[0].shape[-1]
    for part in parts:
        if part.dim() != 2 or part.shape[1] == 0 or part.shape[1] != width:
            raise ValueError(f"features must be a non-empty (N, D) tensor, got {tuple(part.shape)}")
        if not part.is_floating_point():
            raise ValueError(f"features must be floating point, got {part.dtype}")
    if sum(part.shape[0] for part in parts) == 0:
        raise ValueError(
            f"features must be a non-empty (N, D) tensor, got {[tuple(p.shape) for p in parts]}"
            if len(parts) > 1
            else f"features must be a non-empty (N, D) tensor, got {tuple(parts[0].shape)}"
        )
    return parts


def greedy_coreset(
    features: torch.Tensor | Sequence[torch.Tensor],
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
        features: (N, D) memory bank, any float dtype, on any device; or a sequence of
            (N_i, D) parts taken as their concatenation, which is never built (the indices are
            into it).
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
        (K,) int64 distinct indices into ``features`` in pick order, on the features' device.

    Memory is the (N, projection_dim) projection, O(N) running distances and one 65 536 x 256
    block of distances (64 MiB); features are moved to ``device`` in row batches only.
    """
    parts = _parts(features)
    if (
        isinstance(projection_dim, bool)
        or not isinstance(projection_dim, int)
        or projection_dim < 1
    ):
        raise ValueError(f"projection_dim must be a positive int, got {projection_dim!r}")
    if isinstance(num_starts, bool) or not isinstance(num_starts, int) or num_starts < 1:
        raise ValueError(f"num_starts must be a positive int, got {num_starts!r}")
    n = sum(part.shape[0] for part in parts)
    k = coreset_size(n, ratio, count)
    device = torch.device(device) if device is not None else parts[0].device
    generator = torch.Generator().manual_seed(seed)

    projected = random_projection(parts, projection_dim, generator, device, basis=basis)
    if not torch.isfinite(projected).all():
        raise ValueError("features contain NaN or infinite values")
    sq_norms = projected.pow(2).sum(1)
    starts = torch.randperm(n, generator=generator)[: min(num_starts, n)]
    # Greedy k-center only compares distances, so the picks work on squared ones; the start
    # (a mean of distances, as in PatchCore) is computed on true distances and then squared.
    nearest = torch.empty(n, dtype=torch.float32, device=device)
    for rows, sq in _sq_distance_chunks(projected, sq_norms, starts):
        nearest[rows] = sq.sqrt_().mean(1).pow_(2)
    picks = _blocked_greedy(projected, sq_norms, nearest, k, progress)
    return picks.to(parts[0].device)


def _cross_chunks(
    points: torch.Tensor, sq_norms: torch.Tensor, centers: torch.Tensor, rows: int = 65536
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(row slice, (rows, C) squared distances of those points to the points ``centers``
    (indices) less each point's own squared norm), one GEMM per ``rows`` rows. That norm is the
    same in every column, so the callers add it where it costs least."""
    c = points[centers]
    for start in range(0, points.shape[0], rows):
        part = slice(start, start + rows)
        yield part, torch.addmm(sq_norms[centers], points[part], c.t(), alpha=-2.0)


def _sq_distance_chunks(
    points: torch.Tensor, sq_norms: torch.Tensor, centers: torch.Tensor, rows: int = 65536
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(row slice, (rows, C) squared Euclidean distances of those points to the points
    ``centers`` (indices)), clamped at 0 against rounding."""
    for part, cross in _cross_chunks(points, sq_norms, centers, rows):
        yield part, cross.add_(sq_norms[part, None]).clamp_min_(0)


def _closest_sq_distances(
    points: torch.Tensor, sq_norms: torch.Tensor, centers: torch.Tensor, rows: int = 65536
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(row slice, (rows,) squared distance of each of those points to the nearest of the points
    ``centers``). The point's own norm is added after the minimum (and the clamp at 0 after
    that): rounding is monotone, so the values equal :func:`_sq_distance_chunks`' minima
    exactly, without two more passes over the (rows, C) block."""
    for part, cross in _cross_chunks(points, sq_norms, centers, rows):
        yield part, cross.amin(1).add_(sq_norms[part]).clamp_min_(0)


def _sq_distances_to(
    points: torch.Tensor, sq_norms: torch.Tensor, center: torch.Tensor, center_sq_norm: torch.Tensor
) -> torch.Tensor:
    """(N,) squared Euclidean distances of ``points`` (with their ``sq_norms``) to one point."""
    return (points @ center).mul_(-2.0).add_(sq_norms).add_(center_sq_norm).clamp_min_(0)


def _blocked_greedy(
    points: torch.Tensor,
    sq_norms: torch.Tensor,
    nearest: torch.Tensor,
    k: int,
    progress: bool,
    block: int = 256,
    candidates: int = 8192,
) -> torch.Tensor:
    """The greedy k-center picks, exactly, with one pass over all N points per ``block`` picks.

    The plain loop (argmax, then every point's distance to the pick) streams the (N, p) points
    once per pick: memory-bound, 17 of the 20 minutes of a 350-image build. Distances only ever
    shrink, so after a full update the ``candidates`` points of largest distance are the only
    ones that can be picked while their best stays at least the largest distance outside them;
    picks come from that small set (kept exact against each new pick) until ``block`` picks are
    pending or the bound fails, then one GEMM brings every point up to date. ``nearest`` (N,)
    is updated in place; picked points get -1 so exact duplicates are never picked twice.
    """
    n = points.shape[0]
    picks = torch.empty(k, dtype=torch.int64, device=points.device)
    step, pending = 0, 0
    bar = tqdm(total=k, desc="coreset", unit="pt", disable=not progress)
    while step < k:
        if pending:
            fresh = picks[step - pending : step]
            for rows, closest in _closest_sq_distances(points, sq_norms, fresh):
                torch.minimum(nearest[rows], closest, out=nearest[rows])
            nearest[fresh] = -1.0
            pending = 0
        size = min(candidates, n)
        top = torch.topk(nearest, min(size + 1, n))
        bound = float(top.values[size]) if size < n else float("-inf")
        index, best = top.indices[:size], top.values[:size].clone()
        subset, subset_norms = points[index], sq_norms[index]
        while step < k and pending < block:
            farthest, j = torch.max(best, 0)
            if float(farthest) < bound:  # the one host sync per pick
                break  # a point outside the candidates may now be the farthest
            pick = index[j]
            picks[step] = pick
            step, pending = step + 1, pending + 1
            d = _sq_distances_to(subset, subset_norms, points[pick], sq_norms[pick])
            torch.minimum(best, d, out=best)
            best[j] = -1.0
        bar.update(pending)
    bar.close()
    return picks


def reference_greedy(
    points: torch.Tensor, sq_norms: torch.Tensor, nearest: torch.Tensor, k: int
) -> torch.Tensor:
    """The plain greedy k-center loop that :func:`_blocked_greedy` must reproduce: per pick, the
    argmax of ``nearest`` (N,), then every point's squared distance to it (one pass over all
    points). The reference in tests and benchmarks; ``nearest`` is updated in place."""
    picks = torch.empty(k, dtype=torch.int64, device=points.device)
    for step in range(k):
        pick = torch.argmax(nearest)
        picks[step] = pick
        torch.minimum(
            nearest, _sq_distances_to(points, sq_norms, points[pick], sq_norms[pick]), out=nearest
        )
        nearest[pick] = -1.0
    return picks
