"""Fusion, branch statistics, image scores and the threshold rule, against independent numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from engine.calibrate import (
    BranchStats,
    FusionConfig,
    calibrate_threshold,
    fuse_maps,
    gated_composition,
    image_scores,
    peak_gate,
    resize_to,
)
from engine.max_merge import max_fuse_maps


def test_fusion_equals_formula() -> None:
    rng = np.random.default_rng(0)
    logical = rng.random((2, 40, 40)).astype(np.float32)
    structural = rng.random((2, 40, 40)).astype(np.float32) * 5
    composition = rng.random((2, 40, 40)).astype(np.float32) * 2
    maps = {"logical": logical, "structural": structural, "composition": composition}
    stats = {
        "logical": BranchStats(0.4, 0.2),
        "structural": BranchStats(2.0, 1.5),
        "composition": BranchStats(1.0, 0.5),
    }
    weights = {"logical": 3.0, "structural": 1.0, "composition": 0.5}
    got = fuse_maps({b: torch.from_numpy(m) for b, m in maps.items()}, stats, weights, 2.5)
    merged = 1.0 * (structural - 2.0) / 1.5 + 3.0 * (logical - 0.4) / 0.2
    merged += 0.5 * (composition - 1.0) / 0.5
    want = np.stack([gaussian_filter(m.astype(np.float64), sigma=2.5) for m in merged])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_zero_weight_branches_are_left_out_and_all_zero_is_refused() -> None:
    rng = np.random.default_rng(1)
    logical, structural = (torch.from_numpy(rng.random((1, 32, 32))).float() for _ in range(2))
    stats = {"logical": BranchStats(0, 1), "structural": BranchStats(0, 1)}
    only = fuse_maps(
        {"logical": logical, "structural": structural},
        stats,
        {"logical": 2.0, "structural": 0.0},
        2.0,
    )
    want = gaussian_filter(2.0 * logical[0].double().numpy(), sigma=2.0)[None]
    np.testing.assert_allclose(only.numpy(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="every branch has weight 0"):
        fuse_maps({"logical": logical}, stats, {"logical": 0.0}, 2.0)
    with pytest.raises(ValueError, match="no statistics or weight"):
        fuse_maps({"composition": logical}, stats, {"logical": 1.0}, 2.0)


def test_gated_composition_lands_on_the_other_branches_peak() -> None:
    rng = np.random.default_rng(4)
    logical = rng.random((2, 16, 16)).astype(np.float32)
    structural = rng.random((2, 16, 16)).astype(np.float32)
    logical[0, 3, 5] = 9.0  # image 0: the other branches point at (3, 5)
    composition = np.stack([np.full((16, 16), 5.0), np.full((16, 16), -1.0)]).astype(np.float32)
    stats = {b: BranchStats(0.0, 1.0) for b in ("logical", "structural")}
    stats["composition"] = BranchStats(1.0, 2.0)
    maps = {"logical": torch.from_numpy(logical), "structural": torch.from_numpy(structural)}
    base = logical + structural
    gated = gated_composition(
        torch.from_numpy(composition), stats["composition"], torch.from_numpy(base), 8.0
    ).numpy()
    gate = (base - base.min((1, 2), keepdims=True)) / np.ptp(base, (1, 2), keepdims=True)
    z = np.maximum((composition - 1.0) / 2.0, 0.0)  # 2 for image 0, 0 for image 1 (below mean)
    np.testing.assert_allclose(gated, z * gate**8, rtol=1e-5, atol=1e-6)
    assert gated[0, 3, 5] == pytest.approx(2.0) and gated[0].mean() < 0.1
    assert not gated[1].any()
    fused = fuse_maps(
        {**maps, "composition": torch.from_numpy(composition)},
        stats,
        {"logical": 1.0, "structural": 1.0, "composition": 1.0},
        1.0,
        gate_power=8.0,
    )
    want = gaussian_filter(base[0] + gated[0], sigma=1.0)
    np.testing.assert_allclose(fused[0].numpy(), want, rtol=1e-4, atol=1e-4)


def test_the_gate_of_a_flat_map_keeps_the_evidence() -> None:
    """A map with no peak (a blank frame, or a capped branch filling the image at the peak)
    prefers no place: the gate is 1 everywhere, so the composition evidence is not lost."""
    flat = torch.full((1, 8, 8), 0.7)
    torch.testing.assert_close(peak_gate(flat, 8.0), torch.ones(1, 8, 8))
    maps = {b: torch.zeros(1, 8, 8) for b in ("logical", "structural")}
    maps["composition"] = torch.full((1, 8, 8), 9.0)
    stats = {b: BranchStats(0.0, 1.0) for b in maps}
    fused = max_fuse_maps(maps, stats, stats, dict.fromkeys(maps, 1.0), 1.0, 8.0)
    torch.testing.assert_close(fused, torch.full((1, 8, 8), 9.0))


def test_gate_after_blur_adds_the_whole_evidence_at_the_blurred_peak() -> None:
    rng = np.random.default_rng(5)
    logical = rng.random((2, 20, 20)).astype(np.float32)
    structural = rng.random((2, 20, 20)).astype(np.float32)
    logical[:, 8, 11] = 6.0
    composition = np.stack([np.full((20, 20), 7.0), np.full((20, 20), 0.5)]).astype(np.float32)
    stats = {b: BranchStats(0.5, 0.25) for b in ("logical", "structural")}
    stats["composition"] = BranchStats(1.0, 2.0)
    weights = {"logical": 1.0, "structural": 2.0, "composition": 1.5}
    maps = {"logical": logical, "structural": structural, "composition": composition}
    fused = fuse_maps(
        {b: torch.from_numpy(m) for b, m in maps.items()}, stats, weights, 1.5, 8.0, True
    ).numpy()
    merged = (logical - 0.5) / 0.25 + 2.0 * (structural - 0.5) / 0.25
    base = np.stack([gaussian_filter(m.astype(np.float64), sigma=1.5) for m in merged])
    gate = (base - base.min((1, 2), keepdims=True)) / np.ptp(base, (1, 2), keepdims=True)
    z = np.maximum((composition[:, :1, :1] - 1.0) / 2.0, 0.0)  # 3 for image 0, 0 for image 1
    np.testing.assert_allclose(fused, base + 1.5 * z * gate**8, rtol=1e-4, atol=1e-4)
    # the image score rises by exactly the weighted evidence, whatever the peak's shape
    assert fused[0].max() == pytest.approx(base[0].max() + 1.5 * 3.0, rel=1e-5)
    assert fused[1].max() == pytest.approx(base[1].max(), rel=1e-5)


def test_positional_role_is_checked() -> None:
    assert FusionConfig(merge="max", positional_role="shape").capped == ("positional",)
    assert FusionConfig(merge="max").capped == ()
    # like image_scale, a setting of the max merge: the paper's sum sums every map
    assert FusionConfig(merge="sum", positional_role="shape").capped == ()
    with pytest.raises(ValueError, match="positional_role must be one of"):
        FusionConfig(merge="max", positional_role="map")


def test_sigma_scales_with_the_map_size() -> None:
    cfg = FusionConfig(sigma=4.0)
    assert cfg.sigma_at(256) == 4.0 and cfg.sigma_at(128) == 2.0 and cfg.sigma_at(64) == 1.0
    assert (cfg.weight("logical"), cfg.weight("structural"), cfg.weight("composition")) == (
        3.0,
        1.0,
        1.0,
    )
    with pytest.raises(ValueError, match="unknown branch"):
        cfg.weight("fused")


def test_resize_antialiases_only_when_asked_and_shrinking() -> None:
    maps = torch.from_numpy(np.random.default_rng(3).random((1, 64, 64))).float()
    plain = torch.nn.functional.interpolate(maps[:, None], size=(16, 16), mode="bilinear")[:, 0]
    smooth = torch.nn.functional.interpolate(
        maps[:, None], size=(16, 16), mode="bilinear", antialias=True
    )[:, 0]
    assert torch.equal(resize_to(maps, (16, 16)), plain)
    assert torch.equal(resize_to(maps, (16, 16), antialias=True), smooth)
    assert not torch.allclose(plain, smooth)
    grow = torch.nn.functional.interpolate(maps[:, None], size=(80, 80), mode="bilinear")[:, 0]
    assert torch.equal(resize_to(maps, (80, 80), antialias=True), grow)


def test_branch_stats_streaming_equals_numpy() -> None:
    rng = np.random.default_rng(2)
    # Large offset, small spread: a naive float32 sum of squares would lose the variance.
    maps = [1000.0 + rng.normal(size=(n, 16, 16)).astype(np.float32) for n in (1, 3, 2)]
    stats = BranchStats.fit(torch.from_numpy(m) for m in maps)
    everything = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    assert stats.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert stats.std == pytest.approx(everything.std(), rel=1e-9)
    assert BranchStats.fit(maps) == stats


@pytest.mark.parametrize(
    "maps, match",
    [
        ([np.ones((2, 4, 4))], "positive finite std"),
        ([np.array([[1.0, np.nan]])], "NaN"),
        ([], "no validation"),
    ],
)
def test_branch_stats_degenerate(maps: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BranchStats.fit(maps)


def test_fuse_rejects_bad_stats() -> None:
    with pytest.raises(ValueError):
        BranchStats(0.0, 0.0)
    with pytest.raises(ValueError):
        BranchStats(float("nan"), 1.0)


def test_resize_and_image_scores() -> None:
    maps = torch.zeros(2, 8, 8)
    maps[0, 3, 4] = 5.0
    maps[1, 0, 0] = -1.0
    assert image_scores(maps).tolist() == [5.0, 0.0]
    big = resize_to(maps, (16, 24))
    assert big.shape == (2, 16, 24)
    assert resize_to(maps, (8, 8)) is not None and torch.equal(resize_to(maps, (8, 8)), maps)
    with pytest.raises(ValueError):
        resize_to(maps[0], (4, 4))
    with pytest.raises(ValueError):
        resize_to(maps, (0, 4))
    with pytest.raises(ValueError):
        image_scores(torch.zeros(4, 4))


def test_threshold_rule_on_hand_made_scores() -> None:
    scores = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.4, 0.8, 0.6, 1.0]  # n = 10
    # rate 0.2 allows 2 false alarms: threshold is the 8th smallest (0.8); 0.9 and 1.0 exceed it.
    assert calibrate_threshold(scores, 0.2) == 0.8
    assert calibrate_threshold(scores, 0.25) == 0.8  # floor(2.5) = 2
    assert calibrate_threshold(scores, 0.05) == 1.0  # below 1/n: the maximum
    assert calibrate_threshold(scores, 0.0) == 1.0
    assert calibrate_threshold(np.array(scores), 0.5) == 0.5
    assert calibrate_threshold(torch.tensor([3.0]), 0.5) == 3.0
    threshold = calibrate_threshold(scores, 0.3)
    assert sum(s > threshold for s in scores) <= 3


@pytest.mark.parametrize(
    "scores, rate", [([], 0.1), ([1.0, float("nan")], 0.1), ([1.0], 1.0), ([1.0], -0.1)]
)
def test_threshold_bad_inputs(scores: list, rate: float) -> None:
    with pytest.raises(ValueError):
        calibrate_threshold(scores, rate)


def test_fusion_config_defaults_and_validation() -> None:
    cfg = FusionConfig()
    assert (cfg.structural_weight, cfg.logical_weight, cfg.sigma, cfg.target_false_alarm_rate) == (
        1.0,
        3.0,
        4.0,
        0.05,
    )
    for kwargs in (
        {"sigma": 0.0},
        {"logical_weight": -1.0},
        {"structural_weight": 0.0, "logical_weight": 0.0},
        {"target_false_alarm_rate": 1.0},
        {"sigma": float("inf")},
        {"merge": "mean"},
        {"image_scale": "median"},
        {"composition_scale": "mad"},
        {"background_quantile": 1.0},
        {"background_quantile": 0.0},
        {"background_quantile": "0.9"},
        {"background_target": "median"},
    ):
        with pytest.raises(ValueError):
            FusionConfig(**kwargs)
