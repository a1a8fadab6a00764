"""The Runtime benchmarks' setup stays runnable at the presets (CI does not run ``benchmarks/``,
so a preset change that breaks them would otherwise go unseen until a user times the engine)."""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.test_runtime import fitted_branches
from engine.config import cpu_build_preset

GRID, DIM = (8, 8), 40  # DIM >= the preset's composition.pca_dim


def test_cpu_preset_branches_score_frames() -> None:
    config = cpu_build_preset()
    config = replace(config, positional=replace(config.positional, enabled=False))
    assert config.composition.members > 1  # the case that needs the groups standardised
    branches = fitted_branches(config, GRID, DIM)
    score, cell_map = branches["composition"](torch.randn(2, GRID[0] * GRID[1], DIM), GRID)
    assert score.shape == (2,) and torch.isfinite(score).all()
    assert cell_map.shape[0] == 2
