"""The positional memory against a brute-force search, its settings and its saved state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.positional import PositionalConfig, PositionalModel, kcenter_per_cell


def brute_force(model: PositionalModel, train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Each pooled cell of ``test`` against every training cell within ``radius``, one by one."""

    def cells(features: torch.Tensor) -> torch.Tensor:
        projected = ((features - model.mean) @ model.basis).reshape(len(features), *model.grid, -1)
        pool = model.config.pool
        grid = F.avg_pool2d(projected.permute(0, 3, 1, 2), pool, ceil_mode=True)
        return grid.permute(0, 2, 3, 1)

    memory, queries = cells(train), cells(test)
    r = model.config.radius
    _, h, w, _ = queries.shape
    out = torch.empty(queries.shape[:3])
    for i in range(h):
        for j in range(w):
            window = memory[:, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            candidates = window.reshape(-1, window.shape[-1])
            out[:, i, j] = torch.cdist(queries[:, i, j], candidates).amin(-1)
    return out


@pytest.mark.parametrize(
    ("grid", "pool", "radius"),
    [((6, 7), 1, 0), ((6, 7), 1, 2), ((9, 5), 2, 1), ((11, 9), 1, 1), ((3, 2), 1, 2)],
)
def test_the_search_equals_a_brute_force_search(grid, pool, radius) -> None:
    """Windows cut by the grid's edges (a radius wider than the grid included) and partial
    pooling cells (odd grids)."""
    generator = torch.Generator().manual_seed(0)
    dim = 6
    train = torch.randn(4, grid[0] * grid[1], dim, generator=generator)
    test = torch.randn(3, grid[0] * grid[1], dim, generator=generator)
    config = PositionalConfig(enabled=True, pool=pool, radius=radius, dims=5)
    model = PositionalModel(config, dim, grid, len(train)).fit(train, grid)
    got = model(test, grid)
    assert got.shape == (3, *config.pooled_grid(grid))
    torch.testing.assert_close(got, brute_force(model, train, test), rtol=1e-4, atol=1e-4)


def test_a_part_one_cell_away_passes_and_a_missing_or_moved_part_does_not() -> None:
    """What the branch is for: content within the radius of where the training images hold it
    scores 0; a part moved three cells away, and the place it left empty, score high."""
    grid, dim = (8, 8), 3
    part = torch.tensor([5.0, 0.0, 0.0])
    train = torch.zeros(2, 8, 8, dim)
    train[:, 1:4, 1:4] = part  # a 3 x 3-cell part at rows and columns 1-3 in every image
    train = train.reshape(2, 64, dim)
    config = PositionalConfig(enabled=True, pool=1, radius=1, dims=dim)
    model = PositionalModel(config, dim, grid, 2).fit(train, grid)
    near, far = torch.zeros(2, 8, 8, dim)
    near[2:5, 2:5] = part
    far[5:8, 5:8] = part
    near, far = near.reshape(1, 64, dim), far.reshape(1, 64, dim)
    assert model(train[:1], grid).abs().max() < 1e-4
    assert model(near, grid).abs().max() < 1e-4
    scores = model(far, grid)[0]
    assert scores[6, 6] > 4.0 and scores[2, 2] > 4.0  # the moved part and the empty place


@pytest.mark.parametrize("assign", [True, False])
@pytest.mark.parametrize("layout", ["cell-major", "contiguous"])
def test_the_state_dict_holds_finite_values_and_restores_the_scores(layout, assign) -> None:
    """Restored from its own state dict, or from one saved contiguous as (M, h', w', d) as
    artifacts before the cell-major search were: the memory is cell-major again, same scores."""
    grid, dim = (6, 6), 4
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(3, 36, dim, generator=generator)
    config = PositionalConfig(enabled=True, pool=2, radius=1, dims=3)
    model = PositionalModel(config, dim, grid, 3).fit(train, grid)
    assert model.memory.permute(1, 2, 0, 3).is_contiguous()
    state = model.state_dict()
    assert set(state) == {"mean", "basis", "memory"}
    assert all(torch.isfinite(v).all() for v in state.values())
    if layout == "contiguous":
        state = {k: v.contiguous() for k, v in state.items()}
        assert not state["memory"].permute(1, 2, 0, 3).is_contiguous()
    restored = PositionalModel(config, dim, grid, 3)
    restored.load_state_dict(state, assign=assign)
    assert restored.memory.permute(1, 2, 0, 3).is_contiguous()
    assert restored.memory_sq.shape == (3, 3, 3) and torch.isfinite(restored.memory_sq).all()
    test = torch.randn(2, 36, dim, generator=generator)
    torch.testing.assert_close(restored(test, grid), model(test, grid))


def test_wrong_inputs_are_refused() -> None:
    model = PositionalModel(PositionalConfig(enabled=True, dims=2), 4, (4, 4), 2)
    with pytest.raises(ValueError, match="fitted on a"):
        model(torch.zeros(1, 16, 4), (2, 8))
    with pytest.raises(ValueError, match="4-d features"):
        model(torch.zeros(1, 16, 3), (4, 4))
    with pytest.raises(ValueError, match="expects 2 training images, got 3"):
        model.fit(torch.zeros(3, 16, 4), (4, 4))
    capped = PositionalModel(PositionalConfig(enabled=True, dims=2, max_images=2), 4, (4, 4), 2)
    with pytest.raises(ValueError, match="expects 2 training images or more, got 1"):
        capped.fit(torch.zeros(1, 16, 4), (4, 4))
    with pytest.raises(ValueError, match="at least one training image"):
        PositionalModel(PositionalConfig(), 4, (4, 4), 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("radius", -1),
        ("pool", 0),
        ("dims", 0),
        ("dims", 2.5),
        ("enabled", "yes"),
        ("seed", True),
        ("max_images", 0),
        ("max_images", True),
        ("max_images", 1.5),
    ],
)
def test_bad_settings_are_refused(field, value) -> None:
    with pytest.raises(ValueError, match=f"PositionalConfig.{field}"):
        PositionalConfig(**{field: value})


def _capped_and_full(
    train: torch.Tensor, grid: tuple[int, int], rows: int, **settings
) -> tuple[PositionalModel, PositionalModel]:
    dim = train.shape[-1]
    capped = PositionalConfig(enabled=True, dims=dim, max_images=rows, **settings)
    full = PositionalConfig(enabled=True, dims=dim, **settings)
    n = len(train)
    return (
        PositionalModel(capped, dim, grid, capped.memory_rows(n)).fit(train, grid),
        PositionalModel(full, dim, grid, full.memory_rows(n)).fit(train, grid),
    )


def test_up_to_max_images_the_memory_keeps_every_training_image() -> None:
    generator = torch.Generator().manual_seed(2)
    grid = (5, 6)
    train = torch.randn(4, 30, 3, generator=generator)
    capped, full = _capped_and_full(train, grid, 4, pool=1, radius=1)
    assert PositionalConfig(max_images=4).memory_rows(3) == 3
    torch.testing.assert_close(capped.memory, full.memory)


def test_the_kcenter_cap_raises_no_score_by_more_than_its_coverage_radius() -> None:
    """Each kept vector is one of its cell's training vectors, and every dropped one lies within
    the coverage radius of a kept one: the capped score is the full one plus at most that."""
    generator = torch.Generator().manual_seed(3)
    grid, dim, n, rows = (6, 6), 3, 12, 4
    train = torch.randn(n, 36, dim, generator=generator)
    test = torch.randn(5, 36, dim, generator=generator)
    capped, full = _capped_and_full(train, grid, rows, pool=1, radius=1)
    assert capped.memory.shape[0] == rows
    cells = train.reshape(n, *grid, dim) - full.mean  # pool 1, full basis: the same distances
    kept = capped.memory[:, 1:-1, 1:-1] @ capped.basis.T
    gaps = (kept[:, None] - cells[None]).norm(dim=-1)  # (rows, n, h, w)
    assert torch.all(gaps.amin(1) < 1e-4)  # every kept vector is a training vector of its cell
    coverage = float(gaps.amin(0).amax())
    assert coverage > 0
    low, high = full(test, grid), capped(test, grid)
    assert torch.all(high >= low - 1e-4)
    assert torch.all(high <= low + coverage + 1e-4)


def test_the_cap_loses_nothing_when_training_images_repeat() -> None:
    """Three distinct images, each four times: a 3-row memory keeps one copy of each."""
    generator = torch.Generator().manual_seed(4)
    grid = (4, 5)
    train = torch.randn(3, 20, 4, generator=generator).repeat(4, 1, 1)
    capped, full = _capped_and_full(train, grid, 3, pool=2, radius=1)
    test = torch.randn(2, 20, 4, generator=generator)
    torch.testing.assert_close(capped(test, grid), full(test, grid), rtol=1e-4, atol=1e-4)


def test_kcenter_per_cell_starts_near_the_mean_and_takes_the_farthest_next() -> None:
    points = torch.tensor([[0.0], [1.0], [10.0], [0.9]]).reshape(4, 1, 1, 1)
    assert kcenter_per_cell(points, 2).flatten().tolist() == [1.0, 10.0]
