"""The positional memory's search at the cpu preset's shapes, beside the memory bank's kNN.

A frame's 48 x 48 grid of 152-d compact features (EfficientNet-Lite0 at 384 px), the preset's
pool 2, radius 1 and 128 dimensions, with the training images of a synthetic category (60) or
a LOCO-size one (350, all held or capped at ``max_images`` 128 or 64 per cell), at batch 1
and 8. ``test_bank_knn`` times the memory bank's exact kNN of the same queries (12 000 rows, a
synthetic category's bank) as the reference cost of a frame's search.
Run: ``pytest benchmarks --benchmark-only -k positional_search``; docs/PERFORMANCE.md.
"""

from __future__ import annotations

import pytest
import torch

from engine.models.positional import PositionalConfig, PositionalModel
from kernels.knn import knn_min_reference

GRID, DIM, BANK_ROWS = (48, 48), 152, 12_000


def features(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, GRID[0] * GRID[1], DIM, generator=generator)


@pytest.mark.parametrize(("images", "cap"), [(60, None), (350, None), (350, 128), (350, 64)])
@pytest.mark.parametrize("batch", [1, 8])
def test_positional_search(benchmark, images: int, cap: int | None, batch: int) -> None:
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(images, GRID[0] * GRID[1], DIM, generator=generator)
    config = PositionalConfig(enabled=True, max_images=cap)
    model = PositionalModel(config, DIM, GRID, config.memory_rows(images)).fit(train, GRID)
    x = features(batch)
    benchmark.extra_info["memory_mib"] = model.memory.numel() * 4 / 2**20
    scores = benchmark(model, x, GRID)
    assert scores.shape == (batch, 24, 24) and torch.isfinite(scores).all()


@pytest.mark.parametrize("batch", [1, 8])
def test_bank_knn(benchmark, batch: int) -> None:
    bank = torch.randn(BANK_ROWS, DIM, generator=torch.Generator().manual_seed(0))
    queries = features(batch).reshape(-1, DIM)
    distances, _ = benchmark(knn_min_reference, queries, bank)
    assert distances.shape == (len(queries),)
