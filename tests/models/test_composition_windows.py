"""Parts per place in the composition branch: window shapes, the per-place Gaussians against a
direct computation, a missing part in a fixed layout, calibration and state."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from engine.build import apply_overrides
from engine.config import cpu_build_preset
from engine.models.composition import CompositionConfig, CompositionModel
from engine.models.composition.ops import ledoit_wolf, ledoit_wolf_batched
from engine.models.composition.windows import WindowAreas, window_shape

GRID = (12, 12)  # 4 x 4 patch cells per compartment, 3 x 3 compartments
CONFIG = CompositionConfig(enabled=True, n_components=3, pca_dim=3, grid=2, windows=(3, 6))


def test_window_shape_divides_the_grid_and_moves_by_half_a_window() -> None:
    assert window_shape((48, 48), 4) == ((12, 12), (6, 6))
    assert window_shape((48, 48), 6) == ((8, 8), (4, 4))
    assert window_shape((30, 40), 10) == ((3, 4), (1, 2))
    assert window_shape((4, 4), 8) == ((1, 1), (1, 1))  # never below one cell


def test_batched_ledoit_wolf_is_one_estimate_per_set() -> None:
    x = torch.randn(40, 5, 6, generator=torch.Generator().manual_seed(0))
    x[:, 2] *= 7.0  # sets of different scales
    mean, covariance, shrinkage = ledoit_wolf_batched(x)
    for i in range(5):
        m, c, s = ledoit_wolf(x[:, i])
        torch.testing.assert_close(mean[i].float(), m)
        torch.testing.assert_close(covariance[i].float(), c)
        assert shrinkage[i].item() == pytest.approx(s)
    with pytest.raises(ValueError, match=r"\(n, L, d\)"):
        ledoit_wolf_batched(x[:1])


def test_distances_match_a_per_place_scikit_learn_fit() -> None:
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.dirichlet(np.ones(3), size=(20, 12, 12))).permute(0, 3, 1, 2)
    test = torch.from_numpy(rng.dirichlet(np.ones(3), size=(4, 12, 12))).permute(0, 3, 1, 2)
    module = WindowAreas(3, GRID, (3,))
    module.fit(train.float())
    got = module(test.float())[:, 0]
    # by hand: 4 x 4 windows moved by 2 cells -> 5 x 5 places
    areas = [F.avg_pool2d(x, 4, 2).flatten(2).transpose(1, 2).double() for x in (train, test)]
    expected = torch.zeros(4, dtype=torch.float64)
    for place in range(25):
        fit = LedoitWolf().fit(areas[0][:, place].numpy())
        covariance = torch.from_numpy(fit.covariance_) + (1 / 16) ** 2 * torch.eye(3)
        d = areas[1][:, place] - torch.from_numpy(fit.location_)
        d2 = torch.einsum("bk,kl,bl->b", d, torch.linalg.inv(covariance), d)
        expected = torch.maximum(expected, (d2 / 3).sqrt())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_leave_one_out_statistics_score_each_image_under_the_others() -> None:
    weights = layout(12, seed=7)
    module = WindowAreas(3, GRID, (3,))
    module.fit(weights)
    loo = []
    for j in range(12):
        others = WindowAreas(3, GRID, (3,))
        others.fit(torch.cat([weights[:j], weights[j + 1 :]]))
        loo.append(others(weights[j : j + 1])[0, 0].double())
    values = torch.stack(loo)
    center = values.quantile(0.5)
    torch.testing.assert_close(module.loo_center[0].double(), center, rtol=1e-4, atol=1e-5)
    scale = (values.quantile(0.95) - center) / 1.645
    torch.testing.assert_close(module.loo_scale[0].double(), scale, rtol=1e-4, atol=1e-5)
    # held out, good images score above the images the Gaussians were fitted on
    assert module.loo_center[0] > module(weights)[:, 0].median()


def layout(n: int, seed: int, empty: bool = False) -> torch.Tensor:
    """(n, 3, 12, 12) soft weights: one 2 x 2 part (component 2) at a random place inside each
    4 x 4 compartment, floor (0) elsewhere, separator rows and columns (1) at the edges; with
    ``empty`` one compartment has no part."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 12, 12), dtype=np.int64)
    labels[:, [0, 4, 8], :] = 1
    labels[:, :, [0, 4, 8]] = 1
    for i in range(n):
        skip = rng.integers(9) if empty else -1
        for c in range(9):
            if c != skip:
                r, q = 4 * (c // 3) + rng.integers(1, 3), 4 * (c % 3) + rng.integers(1, 3)
                labels[i, r : r + 2, q : q + 2] = 2
    weights = F.one_hot(torch.from_numpy(labels), 3).permute(0, 3, 1, 2).float()
    return 0.9 * weights + 0.1 / 3  # soft, as a temperature gives


def test_an_empty_compartment_stands_out_where_the_whole_image_barely_changes() -> None:
    module = WindowAreas(3, GRID, (3,))
    module.fit(layout(40, seed=0))
    good, empty = module(layout(20, seed=1))[:, 0], module(layout(20, seed=2, empty=True))[:, 0]
    assert empty.min() > good.max() + 1.0


def features_of(weights: torch.Tensor) -> torch.Tensor:
    """Patch features whose k-means components are the layout's labels (plus a little noise)."""
    noise = 0.01 * torch.randn(weights.shape, generator=torch.Generator().manual_seed(0))
    return (weights + noise).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def fitted() -> CompositionModel:
    model = CompositionModel(CONFIG, 3, GRID).fit(features_of(layout(40, seed=0)), GRID)
    distances = model.group_distances(features_of(layout(16, seed=3)), GRID)
    model.calibrate_groups(distances, torch.tensor([0.9, 0.8]))
    return model


def test_the_score_is_the_largest_standardised_distance(fitted: CompositionModel) -> None:
    features = features_of(layout(6, seed=4, empty=True))
    distances = fitted.group_distances(features, GRID)
    assert distances.shape == (6, 3)  # the descriptor, then the two window sizes
    score, cells, *_ = fitted(features, GRID)
    expected = ((distances - fitted.group_center) / fitted.group_scale).amax(1)
    torch.testing.assert_close(score, expected)
    assert cells.shape == (6, 2, 2)
    good = fitted(features_of(layout(20, seed=5)), GRID)[0]
    assert score.min() > good.max()


def test_windows_need_a_calibration_and_survive_a_state_dict(fitted: CompositionModel) -> None:
    features = features_of(layout(4, seed=6))
    uncalibrated = CompositionModel(CONFIG, 3, GRID).fit(features_of(layout(8, seed=0)), GRID)
    with pytest.raises(RuntimeError, match="not calibrated"):
        uncalibrated(features, GRID)
    with pytest.raises(ValueError, match=r"\(N >= 2, 3\)"):
        uncalibrated.calibrate_groups(torch.ones(4, 2), torch.ones(2))
    with pytest.raises(ValueError, match="window_auroc is needed"):
        uncalibrated.calibrate_groups(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"window_auroc must be \(2,\)"):
        uncalibrated.calibrate_groups(torch.ones(4, 3), torch.ones(3))
    restored = CompositionModel(CONFIG, 3, GRID)
    restored.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(restored(features, GRID), fitted(features, GRID))
    assert torch.equal(restored.windows.precision1, fitted.windows.precision1)
    assert torch.equal(restored.group_used, fitted.group_used)


@pytest.mark.parametrize("scale", ["tail", "mad"])
def test_window_sizes_are_standardised_as_configured(scale: str) -> None:
    model = CompositionModel(replace(CONFIG, window_scale=scale), 3, GRID)
    model.fit(features_of(layout(20, seed=0)), GRID)
    distances = model.group_distances(features_of(layout(16, seed=3)), GRID)
    model.calibrate_groups(distances, torch.ones(2))
    median = distances.double().quantile(0.5, dim=0)
    torch.testing.assert_close(model.group_center[0].double(), median[0])
    want = model.windows.loo_center if scale == "tail" else median[1:].float()
    torch.testing.assert_close(model.group_center[1:], want)


def test_windows_need_three_training_images() -> None:
    with pytest.raises(ValueError, match="3 with windows"):
        CompositionModel(CONFIG, 3, GRID).fit(features_of(layout(2, seed=0)), GRID)


def test_a_window_size_below_the_check_is_left_out_of_the_score(fitted: CompositionModel) -> None:
    features = features_of(layout(6, seed=4, empty=True))
    model = CompositionModel(CONFIG, 3, GRID)
    model.load_state_dict(fitted.state_dict())
    distances = model.group_distances(features, GRID)
    model.calibrate_groups(distances, torch.tensor([0.9, 0.7]))  # the check: 0.75
    assert model.group_used.tolist() == [True, True, False]
    z = (distances - model.group_center) / model.group_scale
    torch.testing.assert_close(model(features, GRID)[0], z[:, :2].amax(1))


def test_moving_a_region_breaks_a_fixed_layout_but_not_a_random_one() -> None:
    """The check's premise: in compartments, a part moved elsewhere empties one and crowds
    another; where parts lie anywhere, a moved part is just another good layout."""
    fixed = WindowAreas(3, GRID, (3,))
    fixed.fit(layout(40, seed=0))
    scattered = WindowAreas(3, GRID, (3,))
    scattered.fit(anywhere(40, seed=0))
    assert rearranged_auroc_of(fixed, layout(16, seed=1)) > 0.75  # measured: 0.82
    assert rearranged_auroc_of(scattered, anywhere(16, seed=1)) < 0.6  # measured: 0.46


def anywhere(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 12, 12) soft weights: nine 2 x 2 parts (component 2) anywhere on a floor (0)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 12, 12), dtype=np.int64)
    for i in range(n):
        for _ in range(9):
            r, q = rng.integers(0, 11, 2)
            labels[i, r : r + 2, q : q + 2] = 2
    weights = F.one_hot(torch.from_numpy(labels), 3).permute(0, 3, 1, 2).float()
    return 0.9 * weights + 0.1 / 3


def rearranged_auroc_of(module: WindowAreas, weights: torch.Tensor) -> float:
    good = module(weights)[:, 0]
    moved = module.rearranged(weights, 8, torch.Generator().manual_seed(0))[:, 0]
    return float((moved[:, None] > good[None]).double().mean())


@pytest.mark.parametrize("windows", [(1,), (4, 4), ("4",), (2.0,), [4]])
def test_config_refuses_bad_windows(windows: object) -> None:
    with pytest.raises(ValueError, match="windows"):
        replace(CONFIG, windows=windows)


@pytest.mark.parametrize("check", [-0.1, 1.5, True, "0.7"])
def test_config_refuses_a_bad_window_check(check: object) -> None:
    with pytest.raises(ValueError, match="window_check"):
        replace(CONFIG, window_check=check)


def test_config_refuses_an_unknown_window_scale() -> None:
    with pytest.raises(ValueError, match="window_scale must be one of"):
        replace(CONFIG, window_scale="std")


def test_windows_are_set_from_the_command_line() -> None:
    # the cpu preset's three members do not combine with windows: one fit, then the windows
    one_fit = apply_overrides(cpu_build_preset(), ["composition.members=1"])
    assert not one_fit.composition.groups_calibrated
    config = apply_overrides(one_fit, ["composition.windows=8,6,4"])
    assert config.composition.windows == (8, 6, 4)
    assert config.composition.groups_calibrated
    with pytest.raises(ValueError, match=r"--set composition\.members=1"):
        apply_overrides(cpu_build_preset(), ["composition.windows=8,6,4"])
