"""Composition branch: the placement map (where the descriptor's distance lies) and the cell
histograms it shares the soft weights with."""

from __future__ import annotations

from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from engine.models.composition import PARTS, CompositionConfig, CompositionModel
from engine.models.composition.ops import descriptor_owners
from tests.models.test_composition import DIM, GRID, SMALL, scenes

EVERY_PART = ("+".join(PARTS),)


def per_component(model: CompositionModel, shares: torch.Tensor) -> torch.Tensor:
    """(B, F) shares of d² -> (B, K) by component, read off each part's own layout."""
    config = model.config
    k, cells = config.n_components, config.grid**2
    sizes, out, start = config.part_sizes(), shares.new_zeros(len(shares), k), 0
    for name in config.part_names:
        part = shares[:, start : start + sizes[name]]
        start += sizes[name]
        if name in ("area", "blobs"):
            out += part
        elif name == "pairs":
            for column, (i, j) in enumerate(combinations(range(k), 2)):
                out[:, i] += part[:, column] / 2
                out[:, j] += part[:, column] / 2
        elif name == "grid":
            out += part.reshape(-1, cells, k).sum(1)
        else:  # appearance, spread, blob_spread (q each), blob_size (2 each): component-major
            out += part.reshape(len(part), k, -1).sum(-1)
    assert start == shares.shape[1]
    return out


def expected_placement(model: CompositionModel, features: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for member in [model, *model.members]:
        descriptor, _, weights = member._describe(features)
        u = (descriptor - member.descriptor_mean) / member.descriptor_scale
        shares = u * (u @ member.descriptor_precision)
        d2 = shares.sum(1, keepdim=True).clamp_min(1e-12)
        area = weights.mean((-2, -1)).clamp_min(1e-3)  # a component all but absent
        power = member.config.placement_area_power
        density = per_component(member, shares).clamp_min(0) / d2 / area**power
        total = total + (density[:, :, None, None] * weights).sum(1)
    return total / total.amax((-2, -1), keepdim=True)


def test_owners_give_every_descriptor_dimension_wholly_to_components() -> None:
    config = CompositionConfig(**SMALL, parts=EVERY_PART)
    owners = descriptor_owners(config)
    width = CompositionModel(config, DIM, GRID).descriptor_mean.shape[0]
    assert owners.shape == (width, config.n_components)
    torch.testing.assert_close(owners.sum(1), torch.ones(width))
    assert "owners" not in CompositionModel(config, DIM, GRID).state_dict()  # from the config


@pytest.mark.parametrize("area_power", [1.0, 0.5, 0.0])
def test_placement_is_each_components_share_of_the_distance_as_a_density(
    area_power: float,
) -> None:
    config = CompositionConfig(
        **SMALL, parts=EVERY_PART, members=2, placement_area_power=area_power
    )
    model = CompositionModel(config, DIM, GRID).fit(scenes(40, 4, seed=0), GRID)
    model.calibrate_groups(model.group_distances(scenes(16, 4, seed=3), GRID))
    x = scenes(3, 4, seed=5, extra=1)
    _, _, placement, _ = model(x, GRID)
    assert placement.shape == (3, *GRID)
    torch.testing.assert_close(placement, expected_placement(model, x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(placement.amax((-2, -1)), torch.ones(3))


def test_placement_marks_the_parts_whose_finish_is_off() -> None:
    """Two of four parts take the other finish: the distance lies in the two part components'
    areas and appearance, and the placement on their pixels. (Two extra parts would show
    mostly as less background than any training image had, the one area that never varied
    there, and be placed on the background: docs/ACCURACY.md, ablation 48.)"""
    model = CompositionModel(CompositionConfig(**SMALL), DIM, GRID).fit(scenes(40, 4, seed=0), GRID)
    odd = scenes(6, 4, seed=8, odd=2)
    _, _, placement, _ = model(odd, GRID)
    parts = odd[..., 1].reshape(-1, *GRID) > 1.5
    on_parts = (placement * parts).sum((-2, -1)) / parts.sum((-2, -1))
    background = (placement * ~parts).sum((-2, -1)) / (~parts).sum((-2, -1))
    assert (on_parts > 0.5).all() and (on_parts > 10 * background).all(), (on_parts, background)


def test_cell_histograms_are_each_cells_component_shares() -> None:
    config = CompositionConfig(**SMALL)
    model = CompositionModel(config, DIM, GRID).fit(scenes(40, 4, seed=0), GRID)
    x = scenes(2, 4, seed=9)
    _, cells, weights = model._describe(x)
    pooled = F.adaptive_avg_pool2d(weights, config.grid)  # (B, K, G, G)
    torch.testing.assert_close(cells, pooled.flatten(2).transpose(1, 2))
