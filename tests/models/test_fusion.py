"""engine.models.fusion: the calibrated fusion as module state."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from engine.calibrate import ABSENCE, PLACEMENT, BranchStats, FusionConfig, fuse_maps
from engine.max_merge import mark_absence, max_fuse_maps
from engine.models.composition import CompositionConfig
from engine.models.fusion import Fusion

BRANCHES = ("logical", "structural", "composition")
WEIGHTS = {"logical": 3.0, "structural": 1.0, "composition": 0.5}
STATS = {
    "logical": BranchStats(0.1, 0.3),
    "structural": BranchStats(-1.0, 2.7),
    "composition": BranchStats(4.2, 0.55),
}


def branch_maps(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    maps = {b: torch.rand(2, 16, 16, generator=generator) for b in BRANCHES[:2]}
    maps["composition"] = (torch.rand(2, 1, 1, generator=generator) * 8).expand(-1, 16, 16)
    return maps


def calibrated(**kwargs) -> Fusion:
    fusion = Fusion(BRANCHES, WEIGHTS, 1.5, **kwargs)
    fusion.calibrate(STATS)
    fusion.set_threshold(2.3)
    return fusion


@pytest.mark.parametrize(
    ("gate_power", "after_blur"), [(None, False), (8.0, False), (8.0, True), (2.0, True)]
)
def test_forward_is_fuse_maps_with_the_buffers(gate_power, after_blur) -> None:
    fusion = calibrated(gate_power=gate_power, gate_after_blur=after_blur)
    maps = branch_maps()
    expected = fuse_maps(maps, STATS, WEIGHTS, 1.5, gate_power, after_blur)
    torch.testing.assert_close(fusion(maps), expected, rtol=0, atol=0)


def test_the_state_dict_carries_the_whole_calibration() -> None:
    source = calibrated(gate_power=8.0)
    state = source.state_dict()
    assert set(state) == {
        "mean",
        "std",
        "image_mean",
        "image_std",
        "weight",
        "background",
        "threshold",
    }
    target = Fusion(BRANCHES, {b: 1.0 for b in BRANCHES}, 1.5, gate_power=8.0)
    assert target.stats is None  # read before loading: the cache must not survive the load
    target.load_state_dict(state)
    assert target.stats == STATS and target.weights == WEIGHTS
    assert target.threshold_value == 2.3
    maps = branch_maps(1)
    torch.testing.assert_close(target(maps), source(maps), rtol=0, atol=0)


def test_recalibrating_replaces_what_forward_uses() -> None:
    fusion = calibrated()
    maps = branch_maps()
    before = fusion(maps)
    shifted = {b: BranchStats(s.mean + 1.0, s.std) for b, s in STATS.items()}
    fusion.calibrate(shifted)
    assert fusion.stats == shifted
    torch.testing.assert_close(fusion(maps), fuse_maps(maps, shifted, WEIGHTS, 1.5))
    assert not torch.equal(fusion(maps), before)


def test_the_buffers_hold_the_numbers_exactly() -> None:
    fusion = calibrated()
    assert fusion.mean.tolist() == [s.mean for s in STATS.values()]
    assert fusion.std.tolist() == [s.std for s in STATS.values()]
    assert fusion.threshold.item() == 2.3 and fusion.weight.tolist() == list(WEIGHTS.values())


def test_uncalibrated_fusion_says_so() -> None:
    fusion = Fusion(BRANCHES, WEIGHTS, 1.5)
    assert fusion.stats is None and fusion.threshold_value is None
    assert math.isnan(fusion.threshold.item())
    with pytest.raises(RuntimeError, match="not calibrated"):
        fusion(branch_maps())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "2.3", None, True])
def test_a_bad_threshold_is_refused_and_the_old_one_kept(bad) -> None:
    fusion = calibrated()
    with pytest.raises(ValueError, match="threshold must be"):
        fusion.set_threshold(bad)
    assert fusion.threshold_value == 2.3 and fusion.threshold.item() == 2.3


def test_bad_construction_and_calibration_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct names"):
        Fusion(("logical", "texture"), WEIGHTS, 1.0)
    with pytest.raises(ValueError, match="distinct names"):
        Fusion(("logical", "logical"), WEIGHTS, 1.0)
    with pytest.raises(ValueError, match=r"no fusion weight .*structural"):
        Fusion(("logical", "structural"), {"logical": 1.0}, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        Fusion(BRANCHES, WEIGHTS, 0.0)
    fusion = Fusion(BRANCHES, WEIGHTS, 1.0)
    with pytest.raises(ValueError, match=r"no statistics .*composition"):
        fusion.calibrate({b: STATS[b] for b in BRANCHES[:2]})
    assert fusion.stats is None


IMAGE_STATS = {
    "logical": BranchStats(1.7, 0.45),
    "structural": BranchStats(0.3, 1.1),
    "composition": BranchStats(-0.2, 0.9),
}


def test_max_merge_is_max_fuse_maps_with_the_buffers() -> None:
    fusion = Fusion(BRANCHES, WEIGHTS, 1.5, gate_power=8.0, merge="max")
    with pytest.raises(ValueError, match="needs the branches' image statistics"):
        fusion.calibrate(STATS)
    with pytest.raises(ValueError, match=r"no image statistics .*composition"):
        fusion.calibrate(STATS, {b: IMAGE_STATS[b] for b in BRANCHES[:2]})
    fusion.calibrate(STATS, IMAGE_STATS)
    maps = branch_maps(2)
    want = max_fuse_maps(maps, STATS, IMAGE_STATS, WEIGHTS, 1.5, 8.0)
    torch.testing.assert_close(fusion(maps), want, rtol=0, atol=0)

    restored = Fusion(BRANCHES, WEIGHTS, 1.5, gate_power=8.0, merge="max")
    restored.load_state_dict(fusion.state_dict())
    assert restored.image_stats == IMAGE_STATS
    torch.testing.assert_close(restored(maps), want, rtol=0, atol=0)


def test_from_config_places_the_composition_evidence_when_asked() -> None:
    """``FusionConfig.placement_power`` reaches the module with the composition branch gated
    and ``merge="max"``; the module then needs the placement map beside the branch maps."""
    composition = CompositionConfig(enabled=True)
    config = FusionConfig(merge="max", placement_power=4.0)
    fusion = Fusion.from_config(config, BRANCHES, 16, composition, WEIGHTS)
    assert fusion.placement_power == 4.0
    fusion.calibrate(STATS, IMAGE_STATS)
    maps = branch_maps(2)
    placement = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2))
    want = max_fuse_maps(
        maps,
        STATS,
        IMAGE_STATS,
        WEIGHTS,
        fusion.sigma,
        8.0,
        placement=placement,
        placement_power=4.0,
    )
    torch.testing.assert_close(fusion({**maps, PLACEMENT: placement}), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="need 'placement'"):
        fusion(maps)
    off = [
        Fusion.from_config(FusionConfig(placement_power=4.0), BRANCHES, 16, composition),
        Fusion.from_config(config, BRANCHES, 16, replace(composition, fused_map="image")),
        Fusion.from_config(config, BRANCHES[:2], 16, composition),
    ]
    assert [f.placement_power for f in off] == [None, None, None]
    with pytest.raises(ValueError, match="placement_power needs merge='max'"):
        Fusion(BRANCHES, WEIGHTS, 1.0, 8.0, placement_power=4.0)
    with pytest.raises(ValueError, match="placement_power must be None or in"):
        FusionConfig(placement_power=0.0)


def test_from_config_marks_the_absence_map_when_the_model_has_one() -> None:
    """With ``CompositionConfig.absence_sigma`` and ``merge="max"`` the module marks the
    absence map with ``FusionConfig.absence_weight`` after the merge, and needs the map."""
    composition = CompositionConfig(enabled=True, absence_sigma=0.05)
    config = FusionConfig(merge="max", absence_weight=2.0)
    fusion = Fusion.from_config(config, BRANCHES, 16, composition, WEIGHTS)
    assert fusion.absence_weight == 2.0
    fusion.calibrate(STATS, IMAGE_STATS)
    maps = branch_maps(2)
    absence = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(4)) * 3
    merged = max_fuse_maps(maps, STATS, IMAGE_STATS, WEIGHTS, fusion.sigma, 8.0)
    got = fusion({**maps, ABSENCE: absence})
    torch.testing.assert_close(got, mark_absence(merged, absence, 2.0), rtol=0, atol=0)
    assert (got > merged).any()
    with pytest.raises(ValueError, match="need 'absence'"):
        fusion(maps)
    off = [
        Fusion.from_config(FusionConfig(), BRANCHES, 16, composition),
        Fusion.from_config(config, BRANCHES, 16, replace(composition, absence_sigma=None)),
        Fusion.from_config(config, BRANCHES[:2], 16, composition),
    ]
    assert [f.absence_weight for f in off] == [None, None, None]
    with pytest.raises(ValueError, match="absence_weight needs merge='max'"):
        Fusion(BRANCHES, WEIGHTS, 1.0, absence_weight=1.0)
    with pytest.raises(ValueError, match="absence_weight must be a finite number"):
        FusionConfig(absence_weight=-1.0)


def test_from_config_caps_the_positional_map_when_asked() -> None:
    """``positional_role="shape"`` reaches the module: the positional map is cut at the image's
    score without it, here (no composition branch) the other map branches' peak
    (engine.max_merge.max_fuse_maps)."""
    branches = ("logical", "structural", "positional")
    maps = branch_maps(3)
    maps = {"logical": maps["logical"], "structural": maps["structural"]}
    maps["positional"] = maps["logical"] * 40.0  # far above the others everywhere
    stats = {**STATS, "positional": BranchStats(0.5, 0.2)}
    image_stats = {**IMAGE_STATS, "positional": BranchStats(1.0, 0.4)}
    config = FusionConfig(merge="max", positional_role="shape")
    fusion = Fusion.from_config(config, branches, 16)
    assert fusion.capped == ("positional",)
    fusion.calibrate(stats, image_stats)
    weights = {b: config.weight(b) for b in branches}
    want = max_fuse_maps(maps, stats, image_stats, weights, fusion.sigma, capped=("positional",))
    torch.testing.assert_close(fusion(maps), want, rtol=0, atol=0)
    free = max_fuse_maps(maps, stats, image_stats, weights, fusion.sigma)
    assert (free.amax(dim=(1, 2)) > want.amax(dim=(1, 2)) + 1).all()
    assert Fusion.from_config(FusionConfig(merge="max"), branches, 16).capped == ()
    with pytest.raises(ValueError, match="capped branches need merge='max'"):
        Fusion(branches, weights, 1.0, capped=("positional",))


def test_from_config_equalises_backgrounds_when_asked() -> None:
    """``background_quantile`` reaches the module, which then needs (and applies, and saves in
    its state) each branch's background scale; the sum merge refuses the option."""
    config = FusionConfig(merge="max", background_quantile=0.99)
    fusion = Fusion.from_config(config, BRANCHES, 16)
    assert fusion.background_quantile == 0.99 and fusion.backgrounds is not None
    scales = {"logical": 0.5, "structural": 2.0, "composition": 1.0}
    with pytest.raises(ValueError, match="exactly when background_quantile is set"):
        fusion.calibrate(STATS, IMAGE_STATS)
    with pytest.raises(ValueError, match="background scales must be finite and > 0"):
        fusion.calibrate(STATS, IMAGE_STATS, {**scales, "logical": 0.0})
    with pytest.raises(ValueError, match="no background scales for branch"):
        fusion.calibrate(STATS, IMAGE_STATS, {"logical": 0.5})
    fusion.calibrate(STATS, IMAGE_STATS, scales)
    assert fusion.backgrounds == scales
    maps = branch_maps(4)
    weights = {b: config.weight(b) for b in BRANCHES}
    want = max_fuse_maps(maps, STATS, IMAGE_STATS, weights, fusion.sigma, backgrounds=scales)
    torch.testing.assert_close(fusion(maps), want, rtol=0, atol=0)
    restored = Fusion.from_config(config, BRANCHES, 16)
    restored.load_state_dict(fusion.state_dict())
    assert restored.backgrounds == scales
    plain = Fusion.from_config(FusionConfig(merge="max"), BRANCHES, 16)
    assert plain.backgrounds is None
    with pytest.raises(ValueError, match="exactly when background_quantile is set"):
        plain.calibrate(STATS, IMAGE_STATS, scales)
    summed = FusionConfig(merge="sum", background_quantile=0.99)
    assert summed.equalised_background is None  # the sum ignores it, as it does image_scale
    assert Fusion.from_config(summed, BRANCHES, 16).background_quantile is None
    with pytest.raises(ValueError, match="background_quantile needs merge='max'"):
        Fusion(BRANCHES, WEIGHTS, 1.0, background_quantile=0.99)


def test_max_merge_without_image_statistics_says_so() -> None:
    summed = calibrated()
    assert summed.image_stats is None  # the sum merge has no use for them
    fusion = Fusion(BRANCHES, WEIGHTS, 1.5, merge="max")
    fusion.load_state_dict(summed.state_dict())  # e.g. a state saved by a "sum" fusion
    with pytest.raises(RuntimeError, match="needs the branches' image statistics"):
        fusion(branch_maps())
    with pytest.raises(ValueError, match="merge must be one of"):
        Fusion(BRANCHES, WEIGHTS, 1.5, merge="mean")


@pytest.mark.parametrize(
    ("fused_map", "gate_power", "after_blur"),
    [("gated", 6.0, False), ("gated_after_blur", 6.0, True), ("image", None, False)],
)
def test_from_config_scales_sigma_and_places_the_composition(fused_map, gate_power, after_blur):
    config = FusionConfig(logical_weight=2.0, composition_weight=0.25, sigma=4.0, merge="max")
    composition = CompositionConfig(fused_map=fused_map, gate_power=6.0)
    fusion = Fusion.from_config(config, BRANCHES, 128, composition)
    assert fusion.sigma == 2.0 and fusion.merge == "max"
    assert (fusion.gate_power, fusion.gate_after_blur) == (gate_power, after_blur)
    assert fusion.weights == {"logical": 2.0, "structural": 1.0, "composition": 0.25}
    two = Fusion.from_config(
        config, BRANCHES[:2], 512, composition, {"logical": 1, "structural": 5}
    )
    assert (two.sigma, two.gate_power, two.weights["structural"]) == (8.0, None, 5.0)
