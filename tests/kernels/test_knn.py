"""Structural kNN: reference vs torch.cdist, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels.knn import knn_min, knn_min_reference
from kernels.knn_args import bank_sq_norms
from kernels.knn_triton import knn_min_triton


def exact_nearest(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q,) float64 nearest distance and the (Q, M) float64 distance matrix, via torch.cdist."""
    full = torch.cdist(queries.double(), bank.double())
    return full.min(1).values, full


def assert_nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    dist: torch.Tensor,
    idx: torch.Tensor,
    atol: float,
) -> None:
    """Distances match the exact ones and each index points at a bank row that far away."""
    best, full = exact_nearest(queries, bank)
    dist, idx = dist.cpu(), idx.cpu()
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(dist.double(), best, atol=atol, rtol=0)
    torch.testing.assert_close(full.gather(1, idx[:, None])[:, 0], best, atol=atol, rtol=0)


def test_reference_matches_cdist(gen: torch.Generator) -> None:
    queries, bank = torch.randn(50, 12, generator=gen), torch.randn(200, 12, generator=gen)
    dist, idx = knn_min_reference(queries, bank, chunk=16)  # several chunks, last one partial
    expected = torch.cdist(queries, bank).min(1)
    torch.testing.assert_close(dist, expected.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, expected.indices)


def test_reference_precomputed_norms_are_used(gen: torch.Generator) -> None:
    queries, bank = torch.randn(5, 4, generator=gen), torch.randn(9, 4, generator=gen)
    shifted = bank_sq_norms(bank) + 1.0  # wrong on purpose: every d² grows by 1
    dist, _ = knn_min_reference(queries, bank, bank_sq=shifted)
    expected = (torch.cdist(queries, bank).min(1).values ** 2 + 1.0).sqrt()
    torch.testing.assert_close(dist, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("n_q", "m", "d", "splits"),
    [
        (1, 1, 1, None),
        (45, 300, 70, None),  # odd sizes: partial query, bank and D tiles
        (33, 700, 16, 3),  # three bank ranges, the last one short
        (20, 257, 130, 2),
    ],
)
def test_triton_matches_reference(
    device: torch.device, gen: torch.Generator, n_q: int, m: int, d: int, splits: int | None
) -> None:
    queries, bank = torch.randn(n_q, d, generator=gen), torch.randn(m, d, generator=gen)
    dist, idx = knn_min_triton(queries.to(device), bank.to(device), splits=splits)
    # fp32 on GPU is tf32x3: close to fp32, not bit-equal.
    assert_nearest(queries, bank, dist, idx, atol=1e-3)
    ref_dist, ref_idx = knn_min_reference(queries, bank)
    torch.testing.assert_close(dist.cpu(), ref_dist, atol=1e-3, rtol=1e-4)
    assert (idx.cpu() == ref_idx).float().mean() > 0.95  # only near-ties may differ


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_dtypes(device: torch.device, gen: torch.Generator, dtype: torch.dtype) -> None:
    """Half inputs: products are exact in the FP32 accumulator, so compare with the same values."""
    queries = torch.randn(40, 48, generator=gen).to(dtype)
    bank = torch.randn(300, 48, generator=gen).to(dtype)
    dist, idx = knn_min_triton(queries.to(device), bank.to(device), splits=2)
    assert_nearest(queries, bank, dist, idx, atol=2e-3)


def test_triton_mixed_dtypes(device: torch.device, gen: torch.Generator) -> None:
    queries = torch.randn(30, 24, generator=gen)
    bank = torch.randn(100, 24, generator=gen).half()
    dist, idx = knn_min_triton(queries.to(device), bank.to(device))
    assert_nearest(queries, bank, dist, idx, atol=1e-3)


def test_triton_ties_pick_the_lowest_index(device: torch.device, gen: torch.Generator) -> None:
    # Small integers keep every dot product exact, so equal rows give bit-equal scores.
    rows = torch.randint(-3, 4, (60, 16), generator=gen).float()
    bank = torch.cat([rows, torch.full((200, 16), 50.0), rows])  # copies 260 rows apart
    dist, idx = knn_min_triton(rows.to(device), bank.to(device), splits=2)
    assert torch.equal(idx.cpu(), torch.arange(60))
    assert torch.equal(dist.cpu(), torch.zeros(60))


@pytest.mark.parametrize(
    ("low", "high", "splits"),
    [
        (5, 40, 1),  # one bank tile (every config's BLOCK_M is >= 64)
        (40, 63, 1),  # one tile, its last row
        (10, 100, 1),  # one bank range; two tiles when BLOCK_M is 64 (the interpreter's)
        (10, 300, 2),  # two bank ranges (RANGE_ALIGN = 256: rows 0-255 and 256-319)
    ],
)
def test_equidistant_rows_give_the_lowest_index(
    device: torch.device, low: int, high: int, splits: int
) -> None:
    """Two *different* bank rows at the same distance from a query: the lower index wins, in
    the Triton kernel as in the reference (torch's ``min`` returns the first minimum)."""
    query = torch.tensor([[1.0, -2.0, 3.0, 0.0, 2.0, -1.0, 0.0, 1.0]])
    step = torch.zeros(1, 8)
    step[0, 0] = 1.0
    bank = torch.full((320, 8), 50.0)
    # query +- one unit step: both rows are at distance 1 and every score (small integers) is
    # exact, so the two scores are bit-equal. The +/- order alternates so neither sign wins.
    bank[low], bank[high] = query[0] + step[0], query[0] - step[0]
    flipped = bank.clone()
    flipped[low], flipped[high] = bank[high], bank[low]
    for rows in (bank, flipped):
        dist, idx = knn_min_triton(query.to(device), rows.to(device), splits=splits)
        assert idx.tolist() == [low] and dist.tolist() == [1.0]
        ref_dist, ref_idx = knn_min_reference(query, rows)
        assert ref_idx.tolist() == [low] and ref_dist.tolist() == [1.0]


def test_triton_non_contiguous(device: torch.device, gen: torch.Generator) -> None:
    queries = torch.randn(24, 40, generator=gen).t()  # (40, 24) column-major
    bank = torch.randn(150, 48, generator=gen)[:, ::2]  # (150, 24) stride 2 along D
    dist, idx = knn_min_triton(queries.to(device), bank.to(device))
    assert_nearest(queries, bank, dist, idx, atol=1e-3)


def test_triton_precomputed_norms(device: torch.device, gen: torch.Generator) -> None:
    queries, bank = torch.randn(10, 20, generator=gen), torch.randn(64, 20, generator=gen)
    bank_sq = bank_sq_norms(bank)
    dist, idx = knn_min_triton(queries.to(device), bank.to(device), bank_sq=bank_sq.to(device))
    assert_nearest(queries, bank, dist, idx, atol=1e-3)
    dist_shifted, _ = knn_min_triton(
        queries.to(device), bank.to(device), bank_sq=(bank_sq + 1.0).to(device)
    )
    torch.testing.assert_close(dist_shifted.cpu() ** 2, dist.cpu() ** 2 + 1.0, atol=1e-3, rtol=1e-4)


def test_triton_empty_queries(device: torch.device) -> None:
    dist, idx = knn_min_triton(torch.empty(0, 4, device=device), torch.ones(3, 4, device=device))
    assert dist.shape == (0,) and idx.shape == (0,)


def test_dispatcher_forced_triton(device: torch.device, gen: torch.Generator) -> None:
    queries, bank = torch.randn(8, 16, generator=gen), torch.randn(40, 16, generator=gen)
    dist, idx = knn_min(queries.to(device), bank.to(device), backend="triton")
    assert_nearest(queries, bank, dist, idx, atol=1e-3)


@pytest.mark.parametrize(
    ("queries", "bank", "kwargs", "message"),
    [
        (torch.ones(4), torch.ones(3, 4), {}, "queries must have 2 dims"),
        (torch.ones(4, 5), torch.ones(3, 4), {}, r"expected \(Q, D\) and \(M, D\)"),
        (torch.ones(4, 4), torch.ones(0, 4), {}, "bank is empty"),
        (torch.ones(4, 0), torch.ones(3, 0), {}, "D is 0"),
        (torch.ones(4, 4), torch.ones(3, 4, dtype=torch.float64), {}, "dtype torch.float64"),
        (torch.ones(4, 4), torch.ones(3, 4), {"bank_sq": torch.ones(4)}, r"bank_sq must be \(3,\)"),
        (torch.ones(4, 4), torch.ones(3, 4), {"bank_sq": torch.ones(3).half()}, "float32"),
        (torch.ones(4, 4), torch.ones(3, 4), {"splits": 0}, "splits must be an int"),
        (torch.ones(4, 4), torch.ones(3, 4), {"splits": 4}, "splits must be an int"),
    ],
)
@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_bad_arguments(
    queries: torch.Tensor, bank: torch.Tensor, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        knn_min_triton(queries, bank, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"chunk": 0}, "chunk must be >= 1"), ({"bank_sq": torch.ones(2)}, "bank_sq must be")],
)
def test_reference_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        knn_min_reference(torch.ones(2, 3), torch.ones(3, 3), **kwargs)


@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_refuses_autograd() -> None:
    with pytest.raises(RuntimeError, match="no backward"):
        knn_min_triton(torch.ones(2, 3, requires_grad=True), torch.ones(3, 3))
