"""Greedy coreset: coverage, size, uniqueness, determinism, bounded memory, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.models import coreset
from engine.models.coreset import coreset_size, gather_rows, greedy_coreset


def clustered(
    n_clusters: int = 20, per_cluster: int = 100, dim: int = 32, seed: int = 0
) -> torch.Tensor:
    """Tight Gaussian blobs of very different sizes, so a random subset misses small blobs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 10
    sizes = [per_cluster * 10 if i < 2 else per_cluster // 10 for i in range(n_clusters)]
    return torch.cat(
        [c + 0.1 * torch.randn(s, dim, generator=g) for c, s in zip(centers, sizes, strict=True)]
    )


def max_nearest_distance(points: torch.Tensor, subset: torch.Tensor) -> float:
    return float(torch.cdist(points, subset).min(dim=1).values.max())


def test_coreset_covers_better_than_random_subset() -> None:
    points = clustered()
    picks = greedy_coreset(points, count=40, projection_dim=16, progress=False)
    g = torch.Generator().manual_seed(1)
    worst_random = max_nearest_distance(
        points, points[torch.randperm(len(points), generator=g)[:40]]
    )
    greedy = max_nearest_distance(points, points[picks])
    # 20 blobs and 40 picks: greedy reaches every blob (radius ~ blob size), random does not.
    assert greedy < 0.5 * worst_random
    assert greedy < 3.0


def test_coreset_size_unique_and_in_range() -> None:
    points = torch.randn(1000, 8)
    picks = greedy_coreset(points, ratio=0.1, progress=False)
    assert picks.shape == (100,) and picks.dtype == torch.int64
    assert picks.unique().numel() == 100
    assert int(picks.min()) >= 0 and int(picks.max()) < 1000


def test_duplicates_never_picked_twice() -> None:
    points = torch.zeros(50, 4)
    points[:3] = torch.eye(4)[:3]
    picks = greedy_coreset(points, count=10, progress=False)
    assert picks.unique().numel() == 10


def test_seeded_and_deterministic() -> None:
    points = torch.randn(500, 64)
    a = greedy_coreset(points, count=30, projection_dim=8, seed=3, progress=False)
    b = greedy_coreset(points, count=30, projection_dim=8, seed=3, progress=False)
    c = greedy_coreset(points, count=30, projection_dim=8, seed=4, progress=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_matches_naive_greedy_k_center() -> None:
    """Without projection (projection_dim >= D) the picks equal a plain numpy greedy k-center
    started, as documented, from the mean distance to the seeded start points."""
    points = torch.randn(200, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    picks = greedy_coreset(points, count=25, projection_dim=3, num_starts=3, seed=7, progress=False)

    x = points.numpy()
    starts = torch.randperm(200, generator=torch.Generator().manual_seed(7))[:3].numpy()
    nearest = np.mean([np.linalg.norm(x - x[s], axis=1) for s in starts], axis=0)
    expected = []
    for _ in range(25):
        pick = int(np.argmax(nearest))
        expected.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(x - x[pick], axis=1))
        nearest[pick] = -1.0
    assert picks.tolist() == expected


@pytest.mark.parametrize(("block", "candidates"), [(256, 8192), (8, 64), (3, 4), (1, 1)])
def test_blocked_picks_equal_plain_greedy(block: int, candidates: int) -> None:
    """The blocked search (picks from a few candidates, one GEMM per block) picks exactly what
    the plain one-pass-per-pick greedy picks, also when the candidate bound fails often (tiny
    ``candidates``) and when a block holds one pick. float64, so no rounding tie decides."""
    generator = torch.Generator().manual_seed(2)
    centers = torch.randn(30, 6, generator=generator, dtype=torch.float64) * 4
    points = centers[torch.randint(0, 30, (3000,), generator=generator)]
    points = points + torch.randn(3000, 6, generator=generator, dtype=torch.float64)
    start = ((points - points[0]) ** 2).sum(1)
    sq_norms = (points * points).sum(1)
    picks = coreset._blocked_greedy(
        points, sq_norms, start.clone(), 300, False, block=block, candidates=candidates
    )
    assert torch.equal(picks, coreset.reference_greedy(points, sq_norms, start.clone(), 300))


def test_count_and_ratio_rules() -> None:
    assert coreset_size(1000, 0.1, None) == 100
    assert coreset_size(5, 0.01, None) == 1
    assert coreset_size(10, None, 10) == 10
    for ratio, count in ((None, None), (0.1, 5), (0.0, None), (1.5, None), (None, 0), (None, 11)):
        with pytest.raises(ValueError):
            coreset_size(10, ratio, count)


def test_memory_bounded_no_n_by_n() -> None:
    """N = 200k: an N x N float32 matrix would need 160 GB, far beyond this machine's memory."""
    n = 200_000
    points = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    picks = greedy_coreset(points, count=5, projection_dim=8, progress=False)
    assert picks.unique().numel() == 5


def test_input_not_modified() -> None:
    points = torch.randn(100, 4)
    before = points.clone()
    greedy_coreset(points, count=5, projection_dim=8, progress=False)
    assert torch.equal(points, before)


def test_random_projection_batches_agree() -> None:
    points = torch.randn(300, 40)
    cpu = torch.device("cpu")
    full = coreset.random_projection(points, 8, torch.Generator().manual_seed(0), cpu, batch=1000)
    small = coreset.random_projection(points, 8, torch.Generator().manual_seed(0), cpu, batch=7)
    torch.testing.assert_close(full, small)


def test_coordinates_in_a_basis_give_the_full_vectors_picks() -> None:
    """Features given as coordinates in an orthonormal basis of a subspace (compact patch
    features) get the coreset their full-space vectors get."""
    generator = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(64, 12, generator=generator))[0]  # (D_full, D)
    coordinates = torch.randn(400, 12, generator=generator)
    full = coordinates @ basis.t()
    want = greedy_coreset(full, count=40, projection_dim=8, progress=False)
    got = greedy_coreset(coordinates, count=40, projection_dim=8, basis=basis, progress=False)
    assert torch.equal(got, want)
    unmapped = greedy_coreset(coordinates, count=40, projection_dim=8, progress=False)
    assert not torch.equal(unmapped, want)  # without the basis the projection differs
    with pytest.raises(ValueError, match=r"basis must be \(D_full, 12\)"):
        greedy_coreset(coordinates, count=4, basis=basis[:, :5], progress=False)


@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        (torch.randn(0, 4), {}, r"non-empty \(N, D\) tensor, got \(0, 4\)"),
        (torch.randn(10), {}, r"non-empty \(N, D\) tensor, got \(10,\)"),
        (torch.randn(10, 0), {}, r"non-empty \(N, D\) tensor, got \(10, 0\)"),
        (torch.randint(0, 5, (10, 4)), {}, "must be floating point, got torch.int64"),
        (torch.full((10, 4), float("nan")), {}, "NaN or infinite"),
        (torch.randn(10, 4).index_fill_(0, torch.tensor([3]), float("inf")), {}, "NaN or infinite"),
        # D > projection_dim: the NaN must be caught after the projection too.
        (torch.randn(10, 40).index_fill_(1, torch.tensor([7]), float("nan")), {}, "NaN"),
        (torch.randn(10, 4), {"projection_dim": 0}, "projection_dim must be a positive int"),
        (torch.randn(10, 4), {"projection_dim": 2.5}, "projection_dim must be a positive int"),
        (torch.randn(10, 4), {"projection_dim": True}, "projection_dim must be a positive int"),
        (torch.randn(10, 4), {"num_starts": 0}, "num_starts must be a positive int"),
        (torch.randn(10, 4), {"num_starts": 1.5}, "num_starts must be a positive int"),
        (torch.randn(10, 4), {"count": 20}, r"count must be an int in \[1, 10\], got 20"),
        (torch.randn(10, 4), {"count": None, "ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        (torch.randn(10, 4), {"ratio": 0.5}, "exactly one of ratio or count"),
    ],
    ids=[
        "empty",
        "1-d",
        "zero-dim",
        "int-dtype",
        "nan",
        "inf",
        "nan-projected",
        "projection-0",
        "projection-float",
        "projection-bool",
        "starts-0",
        "starts-float",
        "count-too-big",
        "ratio-0",
        "ratio-and-count",
    ],
)
def test_bad_inputs(features: torch.Tensor, kwargs: dict, message: str) -> None:
    """Each case is otherwise valid (a valid ``count`` unless it is the point of the case), so it
    fails for the reason named in ``message``, not an earlier one."""
    with pytest.raises(ValueError, match=message):
        greedy_coreset(features, **{"count": 2, "progress": False, **kwargs})


@pytest.mark.parametrize("projection_dim", [8, 64])
def test_parts_pick_what_their_concatenation_picks(projection_dim: int) -> None:
    """Features given as parts (memory-bank copies, never joined) get exactly the picks and the
    projection of their concatenation, batches spanning parts included."""
    torch.manual_seed(0)
    parts = [torch.randn(70, 40), torch.randn(0, 40), torch.randn(45, 40), torch.randn(30, 40)]
    whole = torch.cat(parts)
    cpu = torch.device("cpu")
    projected = [
        coreset.random_projection(x, projection_dim, torch.Generator().manual_seed(5), cpu, 32)
        for x in (parts, whole)
    ]
    assert torch.equal(*projected)
    kwargs = {"count": 30, "projection_dim": projection_dim, "seed": 2, "progress": False}
    assert torch.equal(greedy_coreset(parts, **kwargs), greedy_coreset(whole, **kwargs))


def test_gather_rows_reads_the_concatenation_without_building_it() -> None:
    torch.manual_seed(3)
    parts = [torch.randn(32, 12), torch.randn(48, 12), torch.randn(16, 12)]
    rows = torch.tensor([95, 0, 40, 31, 32, 47, 48])
    assert torch.equal(gather_rows(parts, rows), torch.cat(parts)[rows])


def test_parts_must_share_their_width() -> None:
    with pytest.raises(ValueError, match=r"non-empty \(N, D\) tensor, got \(5, 3\)"):
        greedy_coreset([torch.randn(5, 4), torch.randn(5, 3)], count=2, progress=False)
    with pytest.raises(ValueError, match="got no parts"):
        greedy_coreset([], count=2, progress=False)


def test_closest_distances_equal_the_full_blocks_minima_bit_for_bit() -> None:
    """The update pass adds each point's own norm after the minimum: rounding is monotone, so
    the float32 values are exactly those of the full distance block's minima."""
    generator = torch.Generator().manual_seed(8)
    points = torch.randn(1000, 16, generator=generator) * 3
    sq_norms = points.pow(2).sum(1)
    centers = torch.tensor([3, 500, 999, 42])
    full = torch.cat(
        [sq.amin(1) for _, sq in coreset._sq_distance_chunks(points, sq_norms, centers, rows=300)]
    )
    closest = torch.cat(
        [d for _, d in coreset._closest_sq_distances(points, sq_norms, centers, rows=300)]
    )
    assert torch.equal(closest, full)
