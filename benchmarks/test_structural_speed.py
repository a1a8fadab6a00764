"""Structural module speed: greedy coreset selection and kNN scoring, torch vs FAISS in one run.

CUDA: the real LOCO sizes (370 images x 1024 patches = 378 880 x 1024-d features -> 10% coreset;
scoring 1024 query patches of one 256-px image against a 37 888-entry bank); FAISS has no GPU
build here, so on CUDA only the torch index runs. CPU: smaller sizes that finish in seconds
(coreset 20 000 -> 2 000, 1024 queries against a 8 192-entry bank). Few pedantic rounds.
Run: ``pytest benchmarks/test_structural_speed.py --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.models import coreset
from engine.models.coreset import greedy_coreset
from engine.models.knn_index import faiss_available, make_index

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DIM = 1024
CORESET_N, CORESET_RATIO = (370 * 1024, 0.1) if CUDA else (20_000, 0.1)
BANK, QUERIES = (37_888, 1024) if CUDA else (8192, 1024)
# projected points (coreset_projection_dim 128) of a LOCO-size bank, and a pick count that
# keeps the plain loop to seconds
PICK_N, PICK_K = (370 * 1024, 4000) if CUDA else (100_000, 1000)


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return call


def test_coreset_selection(benchmark: object) -> None:
    benchmark.group = "coreset"
    features = torch.randn(CORESET_N, DIM, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    picks = benchmark.pedantic(
        synced(lambda: greedy_coreset(features, ratio=CORESET_RATIO, progress=False)),
        rounds=1 if CUDA else 2,
        iterations=1,
    )
    assert picks.numel() == int(CORESET_N * CORESET_RATIO)
    benchmark.extra_info.update(
        {"device": str(DEVICE), "n": CORESET_N, "dim": DIM, "picks": picks.numel()}
    )


@pytest.mark.parametrize("search", ["plain", "blocked"])
def test_coreset_picks(benchmark: object, search: str) -> None:
    """The greedy picks alone, side by side: the plain loop (one pass over all points per pick)
    against the blocked search the build uses; both return the same picks (tests/models)."""
    benchmark.group = "coreset picks"
    points = torch.randn(PICK_N, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    sq_norms = (points * points).sum(1)
    start = ((points - points[0]) ** 2).sum(1)

    def run() -> torch.Tensor:
        nearest = start.clone()
        if search == "plain":
            return coreset.reference_greedy(points, sq_norms, nearest, PICK_K)
        return coreset._blocked_greedy(points, sq_norms, nearest, PICK_K, progress=False)

    picks = benchmark.pedantic(synced(run), rounds=2, iterations=1)
    assert picks.unique().numel() == PICK_K
    benchmark.extra_info.update({"device": str(DEVICE), "n": PICK_N, "picks": PICK_K})


@pytest.mark.parametrize("kind", ["torch", "faiss_flat"])
def test_knn_scoring(benchmark: object, kind: str) -> None:
    if kind == "faiss_flat" and (CUDA or not faiss_available()):
        pytest.skip("FAISS runs on CPU only and must be installed")
    benchmark.group = "knn scoring (1 image)"
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(BANK, DIM, generator=gen)
    queries = torch.randn(QUERIES, DIM, generator=gen).to(DEVICE)
    index = make_index(kind, device=DEVICE)
    index.add(bank)
    dist, _ = benchmark.pedantic(
        synced(lambda: index.search(queries)), rounds=5, iterations=1, warmup_rounds=1
    )
    assert dist.shape == (QUERIES, 1)
    benchmark.extra_info.update(
        {"device": str(DEVICE), "bank": BANK, "queries": QUERIES, "dim": DIM}
    )
