"""Detector-level deployment transforms."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.detector import Detector
from engine.models.composition import CompositionConfig, CompositionModel
from engine.models.structural import resize_input

TINY = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))


def test_folding_batchnorm_keeps_every_map_and_removes_the_batchnorms() -> None:
    detector, _ = TINY["tiny_detector"](0)
    frames = torch.randint(
        0, 256, (2, 40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    before = detector(frames)
    calls: list[int] = []
    for bn in [*detector.logical.modules(), *detector.structural.modules()]:
        if isinstance(bn, nn.BatchNorm2d):
            bn.register_forward_hook(lambda *_: calls.append(1))
    detector(frames)
    assert calls, "the tiny detector has BatchNorms to fold"

    assert detector.fold_batchnorm() > 0

    calls.clear()
    after = detector(frames)
    assert not calls, "every BatchNorm follows a convolution and is folded"
    for name in ("fused", "logical", "structural"):
        torch.testing.assert_close(
            getattr(after, name), getattr(before, name), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(
    ("mode", "gate_power", "after_blur"),
    [("gated", 8.0, False), ("gated_after_blur", 8.0, True), ("image", None, False)],
)
def test_the_fusion_module_follows_the_configuration(mode, gate_power, after_blur) -> None:
    tiny, config = TINY["tiny_detector"](0)
    composition = CompositionModel(
        replace(CompositionConfig(enabled=True), fused_map=mode),
        tiny.structural.patch_features.out_dim,
        (4, 4),
    )
    detector = Detector(
        tiny.logical,
        tiny.structural,
        replace(config.fusion, composition_weight=0.25),
        tiny.stats | {"composition": tiny.stats["logical"]},
        structural_size=TINY["SIZE"],
        composition=composition,
    )
    fusion = detector.fusion
    expected = ("logical", "structural", "composition")
    assert fusion.branches == expected and detector.branch_names == expected
    assert (fusion.gate_power, fusion.gate_after_blur) == (gate_power, after_blur)
    assert fusion.sigma == config.fusion.sigma_at(detector.map_size)
    assert detector.weights["composition"] == 0.25
    assert detector.stats == fusion.stats and fusion.threshold_value is None


def test_composition_takes_its_own_pass_at_its_own_size() -> None:
    """``CompositionConfig.image_size``: the memory bank scores the structural input, the
    composition branch the same input resized (its grid: 6x6 at 24 px, not the bank's 8x8)."""
    tiny, config = TINY["tiny_detector"](0)
    own = 24
    detector = TINY["with_composition"](tiny, config, own)
    assert detector.composition is not None and detector.composition.grid == (6, 6)
    frames = torch.randint(
        0, 256, (2, 40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    x = detector.structural_transform.batch(frames, channels_last=True)
    features = tiny.structural.patch_features
    with torch.no_grad():
        bank_features, bank_grid = features(x)
        want_structural = tiny.structural.map_from_features(bank_features, bank_grid, (32, 32))
        want_score, _ = detector.composition(*features(resize_input(x, own)))
        side = detector.structural_side(x)
    assert set(side) == {"structural", "composition"}
    torch.testing.assert_close(side["structural"], want_structural)
    torch.testing.assert_close(side["composition"], want_score[:, None, None].expand(-1, 32, 32))
