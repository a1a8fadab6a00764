"""The composition model's absence map (``CompositionConfig.absence_sigma``): where a
component's blurred occupancy falls below the training images' at the same place."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from engine.models.composition import CompositionConfig, CompositionModel
from engine.models.composition.absence import AbsenceMap

GRID = (8, 10)
SIGMA = 0.2  # of the longer side: 2 cells


def soft_weights(n: int, seed: int, k: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, k, *GRID, generator=generator), dim=1)


def fitted(train: torch.Tensor, floor: float = 0.05) -> AbsenceMap:
    absence = AbsenceMap(train.shape[1], GRID, SIGMA, floor)
    absence.fit(train)
    return absence


def test_the_deficit_matches_a_scipy_recomputation() -> None:
    train, test = soft_weights(6, 0), soft_weights(2, 1)
    sigma = SIGMA * max(GRID)

    def blur(w: torch.Tensor) -> np.ndarray:
        x = w.double().numpy()
        return np.stack([[ndimage.gaussian_filter(m, sigma, mode="reflect") for m in i] for i in x])

    occupancy = blur(train)
    mean, std = occupancy.mean(0), np.maximum(occupancy.std(0, ddof=1), 0.05)
    want = np.clip((mean - blur(test)) / std, 0, None).max(1)
    np.testing.assert_allclose(fitted(train).deficit(test).numpy(), want, atol=1e-5)


def test_a_part_taken_away_is_marked_where_it_was() -> None:
    """Component 1 fills a 2 x 2 block at about one place on every training image (moved by
    up to a cell); with the block gone the deficit peaks there and stays ~0 far from it."""
    train = torch.zeros(6, 2, *GRID)
    train[:, 0] = 1.0
    for i, shift in enumerate((0, 1, 0, -1, 1, 0)):
        train[i, :, 2:4, 4 + shift : 6 + shift] = torch.tensor([0.0, 1.0])[:, None, None]
    absence = fitted(train)
    missing = torch.zeros(1, 2, *GRID)
    missing[:, 0] = 1.0
    deficit = absence.deficit(missing)[0]
    row, col = divmod(int(deficit.argmax()), GRID[1])
    assert 2 <= row <= 3 and 3 <= col <= 6
    assert float(deficit[row, col]) > 2.0
    assert float(deficit[7, 0]) < 0.05
    assert float(absence.deficit(train).amax()) < float(deficit.max()) / 2


def test_the_map_is_in_validation_peak_units_and_needs_its_calibration() -> None:
    absence = fitted(soft_weights(6, 0))
    test = soft_weights(3, 2)
    with pytest.raises(RuntimeError, match="not calibrated"):
        absence(test)
    for bad in (torch.ones(1), torch.tensor([1.0, math.nan]), torch.ones(2, 2)):
        with pytest.raises(ValueError, match="finite peaks"):
            absence.calibrate(bad)
    peaks = absence.deficit(soft_weights(5, 3)).amax((-2, -1))
    absence.calibrate(peaks)
    want = (absence.deficit(test) - peaks.double().mean()) / peaks.double().std()
    torch.testing.assert_close(absence(test), want.float())
    restored = AbsenceMap(3, GRID, SIGMA, 0.05)
    restored.load_state_dict(absence.state_dict())
    torch.testing.assert_close(restored(test), absence(test))
    uncalibrated = AbsenceMap(3, GRID, SIGMA, 0.05)
    uncalibrated.load_state_dict(fitted(soft_weights(6, 0)).state_dict())
    with pytest.raises(RuntimeError, match="not calibrated"):
        uncalibrated(test)


def test_the_model_fits_the_map_on_its_own_components_only() -> None:
    config = CompositionConfig(
        enabled=True, n_components=2, pca_dim=4, fit_patches=200, members=2, absence_sigma=0.25
    )
    features = torch.randn(6, GRID[0] * GRID[1], 16, generator=torch.Generator().manual_seed(0))
    model = CompositionModel(config, 16, GRID).fit(features, GRID)
    assert model.absence is not None
    assert all(member.absence is None for member in model.members)
    weights = model.component_weights(features, GRID)
    assert weights.shape == (6, 2, *GRID)
    torch.testing.assert_close(weights.sum(1), torch.ones(6, *GRID))
    torch.testing.assert_close(model.absence.mean, model.absence.occupancy(weights).mean(0))
    peaks = model.absence.peaks(weights[:4])
    assert peaks.shape == (4,)
    torch.testing.assert_close(model.absence_peaks(features[:4], GRID), peaks)
    model.absence.calibrate(peaks)
    got = model.absence(model.component_weights(features[:2], GRID))
    assert got.shape == (2, *GRID) and bool(torch.isfinite(got).all())
    restored = CompositionModel(config, 16, GRID)
    restored.load_state_dict(model.state_dict())
    assert restored.absence is not None
    torch.testing.assert_close(
        restored.absence(restored.component_weights(features[:2], GRID)), got
    )
    plain = CompositionModel(CompositionConfig(enabled=True, n_components=2, pca_dim=4), 16, GRID)
    assert plain.absence is None
    with pytest.raises(RuntimeError, match="not fitted"):
        plain.component_weights(features, GRID)
    with pytest.raises(ValueError, match="absence map"):
        plain.absence_peaks(features, GRID)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("absence_sigma", 0.0),
        ("absence_sigma", 1.5),
        ("absence_sigma", math.nan),
        ("absence_sigma", True),
        ("absence_std_floor", 0.0),
        ("absence_std_floor", 2.0),
    ],
)
def test_bad_absence_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CompositionConfig(**{field: value})
