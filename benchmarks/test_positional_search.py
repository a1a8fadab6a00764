"""The positional memory's search at the cpu preset's shapes, beside the memory bank's kNN.

A frame's 48 x 48 grid of 152-d compact features (EfficientNet-Lite0 at 384 px), the preset's
pool 2, radius 1 and 128 dimensions, with the training images of a synthetic category (60) or
a LOCO-size one (350, all held or capped at ``max_images`` 128 or 64 per cell), at batch 1
and 8 (32 on CUDA, where every case runs on the GPU). ``test_bank_knn`` times the memory
bank's exact kNN of the same queries (12 000 rows, a synthetic category's bank) as the
reference cost of a frame's search, and
``test_tiled_search`` the search the module ran before its cell-major one (one GEMM per 8 x 8
tile against the tile's widened block, out-of-window candidates masked), side by side.
Run: ``pytest benchmarks --benchmark-only -k positional_search``; docs/PERFORMANCE.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.models.positional import PositionalConfig, PositionalModel
from kernels.knn import knn_min_reference

GRID, DIM, BANK_ROWS = (48, 48), 152, 12_000
TILE = 8
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCHES = (1, 32) if CUDA else (1, 8)


def synced(function, *args):
    """``function(*args)``, waiting for the GPU to finish it (timing)."""
    out = function(*args)
    if CUDA:
        torch.cuda.synchronize()
    return out


def padded_squares(model: PositionalModel) -> torch.Tensor:
    """(M, h' + 2r, w' + 2r): the memory's squared norms, +inf on its padding (computed once)."""
    r, memory = model.config.radius, model.memory
    inside = torch.zeros(memory.shape[:3], dtype=torch.bool, device=memory.device)
    inside[:, r : memory.shape[1] - r, r : memory.shape[2] - r] = True
    return memory.pow(2).sum(-1).masked_fill(~inside, math.inf)


def tiled_search(
    model: PositionalModel, memory_sq: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """The previous search: (B, h*w, D) -> (B, h', w'), the same distances as ``model``."""
    x = model._cells(features.float(), model.mean, model.basis)
    batch, h, w, dims = x.shape
    r, n, memory = model.config.radius, model.memory.shape[0], model.memory
    x_sq = x.pow(2).sum(-1)
    nearest = x.new_empty(batch, h, w)
    for top in range(0, h, TILE):
        for left in range(0, w, TILE):
            th, tw = min(TILE, h - top), min(TILE, w - left)
            rows, cols = slice(top, top + th + 2 * r), slice(left, left + tw + 2 * r)
            queries = x[:, top : top + th, left : left + tw].reshape(-1, dims)
            d2 = (
                x_sq[:, top : top + th, left : left + tw].reshape(-1, 1)
                + memory_sq[:, rows, cols].reshape(1, -1)
                - 2 * queries @ memory[:, rows, cols].reshape(-1, dims).T
            ).reshape(batch, th * tw, n, -1)
            a = torch.arange(th, device=x.device)[:, None, None, None]
            b = torch.arange(tw, device=x.device)[None, :, None, None]
            p = torch.arange(th + 2 * r, device=x.device)[None, None, :, None]
            q = torch.arange(tw + 2 * r, device=x.device)[None, None, None, :]
            inside = ((p >= a) & (p <= a + 2 * r) & (q >= b) & (q <= b + 2 * r)).reshape(
                th * tw, 1, -1
            )
            d2 = d2.masked_fill(~inside, math.inf)
            nearest[:, top : top + th, left : left + tw] = d2.amin((-2, -1)).reshape(batch, th, tw)
    return nearest.clamp_min(0).sqrt()


def fitted(images: int, cap: int | None = None) -> PositionalModel:
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(images, GRID[0] * GRID[1], DIM, generator=generator)
    config = PositionalConfig(enabled=True, max_images=cap)
    model = PositionalModel(config, DIM, GRID, config.memory_rows(images)).fit(train, GRID)
    return model.to(DEVICE)


def features(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, GRID[0] * GRID[1], DIM, generator=generator).to(DEVICE)


@pytest.mark.parametrize(("images", "cap"), [(60, None), (350, None), (350, 128), (350, 64)])
@pytest.mark.parametrize("batch", BATCHES)
def test_positional_search(benchmark, images: int, cap: int | None, batch: int) -> None:
    model = fitted(images, cap)
    x = features(batch)
    benchmark.extra_info["memory_mib"] = model.memory.numel() * 4 / 2**20
    scores = benchmark(synced, model, x, GRID)
    assert scores.shape == (batch, 24, 24) and torch.isfinite(scores).all()


@pytest.mark.parametrize("images", [60, 350])
@pytest.mark.parametrize("batch", BATCHES)
def test_tiled_search(benchmark, images: int, batch: int) -> None:
    model = fitted(images)
    x = features(batch)
    scores = benchmark(synced, tiled_search, model, padded_squares(model), x)
    torch.testing.assert_close(scores, model(x, GRID), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("batch", BATCHES)
def test_bank_knn(benchmark, batch: int) -> None:
    bank = torch.randn(BANK_ROWS, DIM, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    queries = features(batch).reshape(-1, DIM)
    distances, _ = benchmark(synced, knn_min_reference, queries, bank)
    assert distances.shape == (len(queries),)
