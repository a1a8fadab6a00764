"""Composition branch: k-means, Ledoit-Wolf, connected components, scores, members, state,
export."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from engine.build import apply_overrides
from engine.config import cpu_build_preset
from engine.models.composition import PARTS, CompositionConfig, CompositionModel, ops
from engine.models.composition.ops import (
    blob_stats,
    label_components,
    ledoit_wolf,
    max_3x3,
    pca_basis,
)
from engine.models.kmeans import kmeans

GRID = (16, 16)
DIM = 8
SMALL = {"n_components": 3, "pca_dim": 4, "grid": 2, "fit_patches": 4000, "kmeans_restarts": 2}


def scenes(n: int, blobs: int, seed: int, extra: int = 0, odd: int = 0) -> torch.Tensor:
    """(n, 16*16, 8) features of a background with ``blobs + extra`` 2x2 parts at random cells of
    a 4x4 layout (one part per layout cell, so parts never touch). Each image's parts share one
    of two finishes (feature 2 = ±0.8); ``odd`` of them take the other one."""
    rng = np.random.default_rng(seed)
    background, part = np.zeros(DIM), np.zeros(DIM)
    background[0], part[1] = 1.0, 3.0
    out = np.empty((n, *GRID, DIM), dtype=np.float32)
    for i in range(n):
        out[i] = background + 0.05 * rng.standard_normal((*GRID, DIM))
        finish = rng.choice([-0.8, 0.8])
        for j, cell in enumerate(rng.choice(16, blobs + extra, replace=False)):
            r, c = 4 * (cell // 4) + rng.integers(0, 2), 4 * (cell % 4) + rng.integers(0, 2)
            out[i, r : r + 2, c : c + 2] = part + 0.05 * rng.standard_normal((2, 2, DIM))
            out[i, r : r + 2, c : c + 2, 2] += -finish if j < odd else finish
    return torch.from_numpy(out.reshape(n, -1, DIM))


@pytest.fixture(scope="module")
def fitted() -> CompositionModel:
    config = CompositionConfig(**SMALL, parts=PARTS)
    return CompositionModel(config, DIM, GRID).fit(scenes(40, 4, seed=0), GRID)


def test_kmeans_is_deterministic_from_its_seed_and_finds_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.from_numpy(np.concatenate([c + rng.standard_normal((50, 2)) for c in centres]))
    first, again = kmeans(x, 3, seed=5), kmeans(x, 3, seed=5)
    assert torch.equal(first, again)
    assert first.dtype == torch.float32 and first.shape == (3, 2)
    nearest = torch.cdist(torch.from_numpy(centres).float(), first).min(1).values
    assert (nearest < 0.5).all()
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(x[:2], 3)


def test_pca_basis_finds_the_main_axis_with_a_fixed_sign() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((500, 3)) * [0.1, 5.0, 1.0] + [1.0, 2.0, 3.0])
    mean, basis = pca_basis(-x, 2)
    torch.testing.assert_close(mean, torch.tensor([-1.0, -2.0, -3.0]), atol=0.5, rtol=0)
    assert basis.shape == (3, 2) and basis[1, 0] > 0.99 and basis[2, 1] > 0.99
    torch.testing.assert_close(basis.t() @ basis, torch.eye(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6, 0.8])
def test_blob_counts_equal_scipy_label_with_8_connectivity(density: float) -> None:
    rng = np.random.default_rng(int(density * 100))
    masks = rng.random((40, 24, 20)) < density
    expected = [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks]
    values = torch.zeros(40, 24 * 20, 1)
    count, _, _ = blob_stats(torch.from_numpy(masks), values, iterations=12, min_size=1)
    assert count.long().tolist() == expected


def test_labels_are_exact_on_a_64_by_64_spiral_within_12_iterations() -> None:
    n = 64
    mask = np.zeros((n, n), bool)
    mask[::2] = True  # rows joined alternately at the right and left ends: one snake
    mask[1::4, -1] = True
    mask[3::4, 0] = True
    labels = label_components(torch.from_numpy(mask)[None], iterations=12)[0].numpy()
    reference, count = ndimage.label(mask, structure=np.ones((3, 3)))
    assert count == 1
    assert (labels[mask] == np.flatnonzero(mask.ravel()).max()).all()
    assert (labels[~mask] == -1).all() and (reference[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_max_3x3_equals_max_pool(dtype: torch.dtype) -> None:
    """The separable maximum that labelling uses is max_pool2d's 3x3, stride 1, padding 1,
    edges and negative values included, in the input's dtype."""
    x = torch.randint(-1, 3000, (5, 7, 9), generator=torch.Generator().manual_seed(0))
    expected = F.max_pool2d(x.double()[:, None], 3, stride=1, padding=1)[:, 0]
    out = max_3x3(x.to(dtype))
    assert out.dtype == dtype
    assert torch.equal(out.double(), expected)


@pytest.mark.parametrize("side", [48, 80])
@pytest.mark.parametrize("density", [0.1, 0.45, 0.6, 0.9])
def test_eager_cpu_labels_equal_all_iterations(density: float, side: int, monkeypatch) -> None:
    """Eager CPU labelling takes scipy's labels (sides up to 64) or stops once an iteration
    changes nothing (larger masks); the compiled and exported graphs run every iteration. All
    must give the same labels, winding snakes included."""
    rng = np.random.default_rng(int(density * 10))
    masks = torch.from_numpy(rng.random((16, side, side)) < density)
    snake = torch.zeros(1, side, side, dtype=torch.bool)
    snake[0, ::2] = True
    snake[0, 1::4, -1] = snake[0, 3::4, 0] = True
    masks = torch.cat([snake, masks])
    eager = label_components(masks, iterations=12)
    monkeypatch.setattr(ops, "_plain_cpu", lambda x: False)
    assert torch.equal(eager, label_components(masks, iterations=12))
    if side <= 64:
        assert torch.equal(eager[:1], label_components(masks[:1], iterations=40))


@pytest.mark.parametrize(
    ("side", "iterations", "fast"),
    [(48, 12, True), (64, 20, True), (65, 12, False), (48, 11, False)],
)
def test_scipy_labels_only_where_the_propagation_is_exact(
    side: int, iterations: int, fast: bool, monkeypatch
) -> None:
    calls = []
    label_with_scipy = ops._label_with_scipy
    monkeypatch.setattr(ops, "_label_with_scipy", lambda m: calls.append(1) or label_with_scipy(m))
    label_components(torch.ones(2, side, side, dtype=torch.bool), iterations=iterations)
    assert bool(calls) is fast


def test_blob_stats_count_size_and_compare_blobs_of_min_size() -> None:
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    values = torch.zeros(2, 8, 8, 1)
    mask[0, 0, 0] = True  # 1 pixel: too small to count or compare
    values[0, 0, 0] = 100.0
    mask[0, 4:6, 4:6] = True  # 4 pixels, value 3
    values[0, 4:6, 4:6] = 3.0
    mask[0, 7, 0:3] = True  # 3 pixels, value 1
    values[0, 7, 0:3] = 1.0
    count, sizes, spread = blob_stats(mask, values.reshape(2, 64, 1), 12, min_size=2, top=2)
    assert count.tolist() == [2.0, 0.0]
    assert sizes.tolist() == [[4.0, 3.0], [0.0, 0.0]]
    assert spread.tolist() == [[1.0], [0.0]]  # std of the blob means 3 and 1; none in mask 1


def test_ledoit_wolf_matches_scikit_learn() -> None:
    covariance_module = pytest.importorskip("sklearn.covariance")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((30, 50)))
    mean, covariance, shrinkage = ledoit_wolf(x)
    reference = covariance_module.LedoitWolf().fit(x.numpy())
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-6)
    np.testing.assert_allclose(covariance.numpy(), reference.covariance_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mean.numpy(), reference.location_, rtol=1e-5, atol=1e-6)


def test_an_extra_part_scores_above_every_good_image(fitted: CompositionModel) -> None:
    good, good_cells, *_ = fitted(scenes(20, 4, seed=1), GRID)
    extra, extra_cells, *_ = fitted(scenes(20, 4, seed=2, extra=1), GRID)
    assert good.max() < extra.min()
    assert good.std() < 0.5 * (extra.mean() - good.mean())
    # every group adds at most about 1 to a good image's squared score (less where the variance
    # floor caps a direction's precision), every cell about 1 too
    assert 0.25 < (good**2).mean() / len(fitted.config.groups) < 2.0
    assert 0.5 < (good_cells**2).mean() < 2.0
    assert extra_cells.shape == (20, 2, 2) and (extra_cells >= 0).all()


def test_one_part_of_the_other_finish_needs_the_relations_between_blobs() -> None:
    # two components, background and parts: both finishes are one component
    config = CompositionConfig(
        **SMALL | {"n_components": 2}, parts=("area+appearance+blob_spread",)
    )
    model = CompositionModel(config, DIM, GRID).fit(scenes(40, 4, seed=0), GRID)
    good, *_ = model(scenes(20, 4, seed=1), GRID)
    mixed, *_ = model(scenes(20, 4, seed=2, odd=1), GRID)
    assert good.max() < mixed.min()
    blind = CompositionModel(replace(config, parts=("area",)), DIM, GRID)
    blind.fit(scenes(40, 4, seed=0), GRID)
    blind_good, *_ = blind(scenes(20, 4, seed=1), GRID)
    blind_mixed, *_ = blind(scenes(20, 4, seed=2, odd=1), GRID)
    assert blind_good.max() >= blind_mixed.min()  # the areas alone cannot tell


def test_parts_have_their_documented_sizes(fitted: CompositionModel) -> None:
    parts = fitted.parts(scenes(2, 4, seed=3), PARTS)
    sizes = fitted.config.part_sizes()
    assert set(sizes) == set(PARTS)
    assert {name: tuple(v.shape) for name, v in parts.items()} == {
        name: (2, sizes[name]) for name in PARTS
    }
    # the component of the parts: 4 blobs of 2x2 cells, 16 of the 256 cells
    part = (parts["area"][0] - 16 / 256).abs().argmin()
    assert parts["blobs"][:, part].tolist() == [4.0, 4.0]
    assert parts["area"][:, part].tolist() == [16 / 256, 16 / 256]


def test_state_dict_round_trip_reproduces_the_outputs(fitted: CompositionModel) -> None:
    x = scenes(3, 4, seed=4)
    restored = CompositionModel(fitted.config, DIM, GRID)
    restored.load_state_dict(fitted.state_dict())
    for got, want in zip(restored(x, GRID), fitted(x, GRID)):
        assert torch.equal(got, want)


def test_unfitted_model_and_wrong_inputs_are_refused(fitted: CompositionModel) -> None:
    x = scenes(1, 4, seed=5)
    with pytest.raises(RuntimeError, match="not fitted"):
        CompositionModel(fitted.config, DIM, GRID)(x, GRID)
    with pytest.raises(ValueError, match="16x16 patch grid"):
        fitted(x, (8, 32))
    with pytest.raises(ValueError, match=r"\(B, 256, 8\)"):
        fitted(x[..., :4], GRID)
    with pytest.raises(ValueError, match="NaN"):
        CompositionModel(fitted.config, DIM, GRID).fit(torch.full((2, 256, DIM), np.nan), GRID)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_components", 1, "n_components must be >= 2"),
        ("pca_dim", 0, "pca_dim must be a positive int"),
        ("grid", True, "grid must be a positive int"),
        ("appearance_dim", 64, "must not exceed pca_dim"),
        ("parts", ("area", "colour"), "every name once"),
        ("parts", ["area"], "parts must be a non-empty tuple of strings"),
        ("parts", (), "parts must be a non-empty tuple of strings"),
        ("parts", ("area", "grid+area"), "every name once"),
        ("parts", ("area+",), "every name once"),
        ("temperature", -0.1, "temperature must be in"),
        ("temperature", 1000, r"temperature must be in \[0, 1000\)"),
        ("gate_power", 0, r"gate_power must be in \(0, 64\]"),
        ("variance_floor", float("nan"), "variance_floor must be in"),
        ("window_check", "0.5", "window_check must be in"),
        ("scale_floor", 0.0, "scale_floor must be in"),
        ("unseen_scale", -0.5, "unseen_scale must be in"),
        ("unseen_scale", True, "unseen_scale must be in"),
        ("placement_area_power", 1.5, r"placement_area_power must be in \[0, 1\]"),
        ("placement_area_power", float("nan"), "placement_area_power must be in"),
        ("seed", -1, "seed must be a non-negative int"),
        ("image_size", 0, "image_size must be a positive int"),
        ("image_size", 384.0, "image_size must be a positive int"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompositionConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0),
        ("gate_power", 64),
        ("scale_floor", 1),
        ("unseen_scale", 0),
        ("placement_area_power", 0),
        ("placement_area_power", 1),
    ],
)
def test_config_accepts_the_ends_of_its_closed_ranges(field: str, value: float) -> None:
    assert getattr(CompositionConfig(**{field: value}), field) == value


def test_config_parts_are_covariance_groups() -> None:
    config = CompositionConfig(n_components=4, parts=("area+grid", "spread"))
    assert config.groups == (("area", "grid"), ("spread",))
    assert config.part_names == ("area", "grid", "spread")
    width = CompositionModel(config, DIM, GRID).descriptor_mean.shape[0]
    assert width == 4 + 4 * 16 + 4 * 2


@pytest.mark.parametrize("model", ["fitted", "members"])
def test_forward_exports_with_torch_export(model: str, request: pytest.FixtureRequest) -> None:
    fitted = request.getfixturevalue(model)
    x = scenes(2, 4, seed=6)

    class Wrapped(torch.nn.Module):
        def __init__(self, model: CompositionModel) -> None:
            super().__init__()
            self.model = model

        def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.model(features, GRID)

    exported = torch.export.export(Wrapped(fitted), (x,))
    for got, want in zip(exported.module()(x), fitted(x, GRID)):
        torch.testing.assert_close(got, want)


def test_few_training_images_give_bounded_scores() -> None:
    """Parts that never vary on a handful of training images must not make the smallest change
    score in the millions (a build on 8 images fused maps of 8e6 before the floors)."""
    model = CompositionModel(CompositionConfig(**SMALL), DIM, GRID)
    model.fit(scenes(1, 4, seed=0).repeat(3, 1, 1), GRID)  # nothing varies at all
    good, *_ = model(scenes(5, 4, seed=1), GRID)
    extra, cells, *_ = model(scenes(5, 4, seed=2, extra=1), GRID)
    assert torch.isfinite(extra).all() and torch.isfinite(cells).all()
    assert extra.max() < 1e3 and good.max() < 1e3


def test_a_dimension_that_never_varied_is_scaled_by_its_components_patch_spread() -> None:
    """One part per training image: no component ever forms two blobs, so every blob_spread
    dimension is 0 on all of them. A good-looking image whose parts form two blobs must not
    score far out on those dimensions alone."""
    config = CompositionConfig(**SMALL, parts=("area+appearance+spread+blob_spread",))
    train = scenes(40, 1, seed=0)
    plain = CompositionModel(replace(config, unseen_scale=0.0), DIM, GRID).fit(train, GRID)
    unseen = CompositionModel(replace(config, unseen_scale=1.0), DIM, GRID).fit(train, GRID)
    sizes = config.part_sizes()
    blob_spread = slice(len(plain.descriptor_scale) - sizes["blob_spread"], None)
    assert plain.describe(train)[0][:, blob_spread].abs().max() == 0
    raised = unseen.descriptor_scale / plain.descriptor_scale
    assert (raised[blob_spread] > 5).all()  # floored by the other dimensions' median before
    assert torch.equal(raised[: blob_spread.start], torch.ones(blob_spread.start))
    good, split = scenes(20, 1, seed=1), scenes(20, 2, seed=2)
    assert torch.allclose(unseen(good, GRID)[0], plain(good, GRID)[0])
    # two parts: the areas change (about 10 for both), the blob spreads only for the plain model
    assert unseen(split, GRID)[0].max() < 0.7 * plain(split, GRID)[0].max()


def test_own_pass_only_when_the_size_differs_from_the_memory_bank() -> None:
    assert CompositionConfig().own_pass_size(384) is None
    assert CompositionConfig(image_size=384).own_pass_size(384) is None
    assert CompositionConfig(image_size=384).own_pass_size(448) == 384


# Members: several k-means fits of one composition model, their scores averaged.
MEMBERS = CompositionConfig(**SMALL, members=3, seed=4)


@pytest.fixture(scope="module")
def members() -> CompositionModel:
    model = CompositionModel(MEMBERS, DIM, GRID).fit(scenes(40, 4, seed=0), GRID)
    model.calibrate_groups(model.group_distances(scenes(16, 4, seed=3), GRID))
    return model


def test_each_member_is_the_model_fitted_with_its_own_seed(members: CompositionModel) -> None:
    x = scenes(5, 4, seed=6, extra=1)
    distances = members.group_distances(x, GRID)
    assert distances.shape == (5, 3)
    for i in range(3):
        alone = CompositionModel(replace(MEMBERS, members=1, seed=4 + i), DIM, GRID)
        alone.fit(scenes(40, 4, seed=0), GRID)
        torch.testing.assert_close(distances[:, i], alone(x, GRID)[0])


def test_the_score_is_the_standardised_mean_of_the_standardised_members(
    members: CompositionModel,
) -> None:
    validation = members.group_distances(scenes(16, 4, seed=3), GRID).double()
    center = validation.quantile(0.5, dim=0)
    scale = 1.4826 * (validation - center).abs().quantile(0.5, dim=0)
    mean = ((validation - center) / scale).mean(1)
    torch.testing.assert_close(members.group_center.double(), center)
    torch.testing.assert_close(members.group_scale.double(), scale)
    x = scenes(6, 4, seed=7, extra=1)
    z = ((members.group_distances(x, GRID).double() - center) / scale).mean(1)
    m = mean.quantile(0.5)
    want = (z - m) / (1.4826 * (mean - m).abs().quantile(0.5))
    torch.testing.assert_close(members(x, GRID)[0].double(), want, rtol=1e-5, atol=1e-5)
    # on its own validation images the score is centred with a unit median absolute deviation
    own = members(scenes(16, 4, seed=3), GRID)[0].double()
    assert abs(float(own.quantile(0.5))) < 1e-5


def test_with_members_an_extra_part_scores_above_every_good_image(
    members: CompositionModel,
) -> None:
    good = members(scenes(20, 4, seed=1), GRID)[0]
    extra = members(scenes(20, 4, seed=2, extra=1), GRID)[0]
    assert good.max() < extra.min()


def test_members_need_a_calibration_and_survive_a_state_dict(members: CompositionModel) -> None:
    x = scenes(4, 4, seed=8)
    uncalibrated = CompositionModel(MEMBERS, DIM, GRID).fit(scenes(8, 4, seed=0), GRID)
    with pytest.raises(RuntimeError, match="not calibrated"):
        uncalibrated(x, GRID)
    with pytest.raises(ValueError, match=r"\(N >= 2, 3\)"):
        uncalibrated.calibrate_groups(torch.ones(4, 1))
    restored = CompositionModel(MEMBERS, DIM, GRID)
    restored.load_state_dict(members.state_dict())
    assert any(key.startswith("members.1.") for key in members.state_dict())
    torch.testing.assert_close(restored(x, GRID), members(x, GRID))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"members": 0}, "members must be a positive int"),
        ({"members": True}, "members must be a positive int"),
        ({"members": 2, "windows": (4,)}, "not combined with fine_parts or windows"),
        ({"members": 2, "fine_parts": True}, "not combined with fine_parts or windows"),
    ],
)
def test_config_refuses_bad_members(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(MEMBERS, **changes)


def test_members_are_set_from_the_command_line() -> None:
    config = apply_overrides(cpu_build_preset(), ["composition.members=5"])
    assert config.composition.members == 5
    assert config.composition.groups_calibrated
