"""Fine parts of the composition branch: blob shapes, the ridge head, calibration, state."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from engine.models.composition import CompositionConfig, CompositionModel
from engine.models.composition.fine import (
    TOP_LENGTHS,
    FineParts,
    RidgeFit,
    fine_inputs,
    fit_fine_parts,
)
from engine.models.composition.ops import blob_shapes

GRID = (8, 8)  # the patch grid; the fine levels: layer1 at 16 x 16, layer2 at 8 x 8
DIM, C1, C2 = 6, 3, 3
CONFIG = CompositionConfig(
    enabled=True, n_components=3, pca_dim=4, grid=2, fit_patches=2000, fine_parts=True
)


def reference_lengths(mask: np.ndarray, min_size: int, top: int) -> list[float]:
    """The longest blobs' lengths with scipy's labels and numpy moments, 0-padded to ``top``."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    lengths = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        if ys.size >= min_size:
            cov = np.cov(np.stack([ys, xs]).astype(float), bias=True)
            lengths.append(4.0 * np.sqrt(max(np.linalg.eigvalsh(cov)[-1], 0.0)) / max(mask.shape))
    lengths = sorted(lengths, reverse=True)[:top]
    return lengths + [0.0] * (top - len(lengths))


def test_blob_shapes_match_scipy_labels_and_numpy_moments() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((6, 20, 24)) < 0.35
    count, lengths = blob_shapes(torch.from_numpy(masks), 40, min_size=3, top=4)
    for mask, got_count, got_lengths in zip(masks, count, lengths, strict=True):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1))
        assert got_count == (sizes >= 3).sum()
        np.testing.assert_allclose(got_lengths.numpy(), reference_lengths(mask, 3, 4), atol=1e-5)


def test_a_longer_bar_measures_longer() -> None:
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 10, 4:20] = True  # 16 cells
    masks[1, 10, 4:24] = True  # 20 cells: 25 % longer
    _, lengths = blob_shapes(masks, 12, min_size=2, top=1)
    # a thin bar of n cells: 4 * sqrt((n² - 1) / 12) / 32
    expected = [4 * np.sqrt((n * n - 1) / 12) / 32 for n in (16, 20)]
    np.testing.assert_allclose(lengths[:, 0].numpy(), expected, rtol=1e-5)


def test_ridge_recovers_a_linear_map_whatever_the_batching() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((400, 5)) * [1, 10, 0.1, 3, 1] + [5, 0, 1, -2, 0])
    weight = torch.from_numpy(rng.standard_normal((5, 3)))
    y = x @ weight + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    whole, split = RidgeFit(5, 3), RidgeFit(5, 3)
    whole.add(x, y)
    split.add(x[:150], y[:150])
    split.add(x[150:], y[150:])
    w, b = whole.solve(ridge=1e-6)
    torch.testing.assert_close(w.double(), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.double(), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    for got, expected in zip(split.solve(), whole.solve(), strict=True):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="at least 2 samples"):
        RidgeFit(5, 3).solve()


def test_head_maps_then_upsamples_as_the_fit_upsamples_then_maps() -> None:
    """The head's layer2 term is mapped before the upsampling; fitted on upsampled features,
    the two orders agree (a linear map commutes with bilinear interpolation)."""
    torch.manual_seed(0)
    layer1, layer2 = torch.randn(2, C1, 16, 16), torch.randn(2, C2, 8, 8)
    parts = FineParts((C1, C2), 3)
    ridge = RidgeFit(C1 + C2, 3)
    samples, _ = fine_inputs(layer1, layer2, torch.rand(2, 3, 8, 8), torch.Generator())
    ridge.add(samples, torch.randn(samples.shape[0], 3, dtype=torch.float64))
    parts.fit_head(ridge)
    weight, bias = ridge.solve()
    up = F.interpolate(layer2, size=(16, 16), mode="bilinear", align_corners=False)
    direct = torch.einsum("bchw,ck->bkhw", torch.cat([layer1, up], 1), weight)
    torch.testing.assert_close(
        parts.logits(layer1, layer2), direct + bias[:, None, None], atol=1e-4, rtol=1e-4
    )


def scene_batch(n: int, seed: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 32, 32) images of a dark floor with 3 + ``extra`` bright 3 x 3 squares, two of them
    only one pixel apart, and their (features, fine levels) through :func:`extract`."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 3, 32, 32), dtype=np.float32)
    for i in range(n):
        images[i] += 0.02 * rng.standard_normal((3, 32, 32))
        row = rng.integers(2, 24)
        for c in (2, 6):  # a pair of touching parts: one blob on the 4-px grid, two at 2 px
            images[i, :, row : row + 3, c : c + 3] += 1.0
        for _ in range(1 + extra):
            r, c = rng.integers(14, 28, 2)
            images[i, :, r : r + 3, c : c + 3] += 1.0
    return torch.from_numpy(images)


def extract(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[torch.Tensor, ...]]:
    """A stand-in backbone: patch features on a 4-px grid, 'layer1' at 2 px, 'layer2' at 4 px."""
    coarse = F.avg_pool2d(x, 4)
    features = torch.cat([coarse, F.avg_pool2d(x * x, 4)], 1).flatten(2).transpose(1, 2)
    return features, GRID, (F.avg_pool2d(x, 2), coarse)


@pytest.fixture(scope="module")
def fitted() -> CompositionModel:
    train = scene_batch(30, seed=0)
    features = extract(train)[0]
    model = CompositionModel(CONFIG, DIM, GRID, (C1, C2)).fit(features, GRID)
    fit_fine_parts(model, extract, lambda: iter(train.split(8)), seed=0)
    model.calibrate_groups(model.group_distances(*extract(scene_batch(12, seed=1))))
    return model


def test_fine_parts_need_their_levels_and_a_calibration() -> None:
    with pytest.raises(ValueError, match="needs fine_channels"):
        CompositionModel(CONFIG, DIM, GRID)
    train = scene_batch(8, seed=0)
    features, grid, levels = extract(train)
    model = CompositionModel(CONFIG, DIM, GRID, (C1, C2)).fit(features, grid)
    fit_fine_parts(model, extract, lambda: iter([train]), seed=0)
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(features, grid, levels)
    with pytest.raises(ValueError, match="fine-level features are needed"):
        model.group_distances(features, grid)
    plain = CompositionModel(replace(CONFIG, fine_parts=False), DIM, GRID).fit(features, grid)
    with pytest.raises(ValueError, match="fine-level features are needed"):
        plain(features, grid, levels)
    with pytest.raises(ValueError, match="for a model with fine parts"):
        plain.calibrate_groups(torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"\(N >= 2, 2\)"):
        model.calibrate_groups(torch.ones(4, 3))


def test_calibrated_scores_are_the_larger_standardised_distance(fitted: CompositionModel) -> None:
    features, grid, levels = extract(scene_batch(6, seed=2, extra=2))
    distances = fitted.group_distances(features, grid, levels)
    score, cells, *_ = fitted(features, grid, levels)
    expected = ((distances - fitted.group_center) / fitted.group_scale).amax(1)
    torch.testing.assert_close(score, expected)
    assert cells.shape == (6, 2, 2)
    assert fitted.fine.describe(*levels).shape == (6, 3 * (1 + TOP_LENGTHS))


def test_fine_parts_count_parts_the_patch_grid_merges(fitted: CompositionModel) -> None:
    """Two more parts than any training image: the fine distance, in calibrated units, rises
    for most images, and so does the score."""
    good = extract(scene_batch(20, seed=3))
    extra = extract(scene_batch(20, seed=4, extra=2))
    fine_good, fine_extra = (
        (fitted.group_distances(*x)[:, 1] - fitted.group_center[1]) / fitted.group_scale[1]
        for x in (good, extra)
    )
    assert fine_extra.median() > fine_good.quantile(0.9) + 1.0
    assert fitted(*extra)[0].median() > fitted(*good)[0].quantile(0.9)


def test_state_dict_round_trip_keeps_scores_and_calibration(fitted: CompositionModel) -> None:
    restored = CompositionModel(CONFIG, DIM, GRID, (C1, C2))
    restored.load_state_dict(fitted.state_dict())
    features, grid, levels = extract(scene_batch(4, seed=5))
    torch.testing.assert_close(restored(features, grid, levels), fitted(features, grid, levels))
    assert torch.equal(restored.fine.precision, fitted.fine.precision)
