"""The Runtime benchmarks' setup stays runnable at the presets (CI does not run ``benchmarks/``,
so a preset change that breaks them would otherwise go unseen until a user times the engine)."""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.test_runtime import fitted_branches, to_full
from engine.config import cpu_build_preset

GRID, DIM, FULL = (8, 8), 40, 64  # DIM >= the preset's composition.pca_dim


def test_cpu_preset_composition_scores_frames_in_both_coordinates() -> None:
    """The preset's composition (several fits) scores frames, and carried over to full
    coordinates (every fit rotated) it gives the compact model's scores."""
    config = cpu_build_preset()
    config = replace(config, positional=replace(config.positional, enabled=False))
    assert config.composition.members > 1  # the case that needs the groups standardised
    composition = fitted_branches(config, GRID, DIM)["composition"]
    compact = torch.randn(2, GRID[0] * GRID[1], DIM, generator=torch.Generator().manual_seed(5))
    score, cell_map, placement, weights = composition(compact, GRID)
    assert score.shape == (2,) and torch.isfinite(score).all()
    assert cell_map.shape[0] == 2
    basis = torch.linalg.qr(torch.randn(FULL, DIM, generator=torch.Generator().manual_seed(6)))[0]
    full = to_full(composition, basis)
    full_score, full_map, full_placement, full_weights = full(compact @ basis.t(), GRID)
    torch.testing.assert_close(full_score, score, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full_map, cell_map, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full_placement, placement, rtol=1e-4, atol=1e-4)
    assert composition.absence is not None and full.absence is not None  # the preset maps it
    # the forward's weights are the main fit's assignment, what the absence map takes
    torch.testing.assert_close(weights, composition.component_weights(compact, GRID))
    absence = composition.absence(weights)
    full_absence = full.absence(full_weights)
    assert absence.shape == (2, *GRID) and torch.isfinite(absence).all()
    torch.testing.assert_close(full_absence, absence, rtol=1e-4, atol=1e-4)
