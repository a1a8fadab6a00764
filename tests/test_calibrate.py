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
    fit_image_stats,
    fuse_maps,
    gated_composition,
    image_scores,
    image_stats_from_scores,
    max_fuse_maps,
    max_fuse_scores,
    peak_gate,
    resize_to,
    standardised_maps,
    weigh_evidence,
)


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


def max_fusion_case(seed: int = 6):
    """Maps, pixel and image statistics and weights for the max merge, in numpy."""
    rng = np.random.default_rng(seed)
    maps = {
        "logical": rng.random((3, 20, 20)).astype(np.float32),
        "structural": rng.random((3, 20, 20)).astype(np.float32) * 4,
    }
    maps["logical"][0, 4, 15] = 5.0  # image 0: a logical peak
    maps["structural"][1, 12, 3] = 30.0  # image 1: a structural peak
    scores = np.array([0.5, 2.0, 9.0], dtype=np.float32)  # image 2: composition evidence
    maps["composition"] = np.broadcast_to(scores[:, None, None], (3, 20, 20)).copy()
    stats = {
        "logical": BranchStats(0.5, 0.3),
        "structural": BranchStats(2.0, 1.2),
        "composition": BranchStats(1.0, 2.0),
    }
    image_stats = {
        "logical": BranchStats(1.5, 0.5),
        "structural": BranchStats(0.8, 2.0),
        "composition": BranchStats(0.2, 1.5),
    }
    weights = {"logical": 1.0, "structural": 0.5, "composition": 2.0}
    return maps, stats, image_stats, weights


def test_max_merge_equals_the_formula() -> None:
    maps, stats, image_stats, weights = max_fusion_case()
    sigma, power = 1.5, 8.0
    got = max_fuse_maps(
        {b: torch.from_numpy(m) for b, m in maps.items()}, stats, image_stats, weights, sigma, power
    ).numpy()

    def scaled(branch: str, values: np.ndarray) -> np.ndarray:
        (mean, std), (image_mean, image_std) = (
            stats[branch].as_tuple(),
            image_stats[branch].as_tuple(),
        )
        values = (values.astype(np.float64) - mean) / std
        if branch != "composition":
            values = np.stack([gaussian_filter(v, sigma=sigma, mode="reflect") for v in values])
        z = (values - image_mean) / image_std
        return np.where(z > 0, weights[branch] * z, z)  # the weight scales evidence only

    base = np.maximum(scaled("logical", maps["logical"]), scaled("structural", maps["structural"]))
    top = base.max((1, 2), keepdims=True)
    gate = (base - base.min((1, 2), keepdims=True)) / np.ptp(base, (1, 2), keepdims=True)
    composition = scaled("composition", maps["composition"])
    want = base + np.maximum(composition - top, 0.0) * gate**power
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the image score is the largest of the branches' own image scores, composition included
    branch_scores = np.stack([base.max((1, 2)), composition[:, 0, 0]]).max(0)
    np.testing.assert_allclose(got.max((1, 2)), branch_scores, rtol=1e-5, atol=1e-5)
    assert composition[2, 0, 0] > top[2, 0, 0]  # image 2 is raised by its composition score
    assert composition[0, 0, 0] < top[0, 0, 0]


def test_max_merge_without_the_gate_and_with_one_branch() -> None:
    maps, stats, image_stats, weights = max_fusion_case(7)
    tensors = {b: torch.from_numpy(m) for b, m in maps.items()}
    standardised = standardised_maps(tensors, stats, 1.0)
    scaled = {
        b: weigh_evidence((standardised[b] - image_stats[b].mean) / image_stats[b].std, weights[b])
        for b in tensors
    }
    floor = max_fuse_maps(tensors, stats, image_stats, weights, 1.0)
    want = torch.maximum(
        torch.maximum(scaled["logical"], scaled["structural"]), scaled["composition"]
    )
    torch.testing.assert_close(floor, want)
    alone = max_fuse_maps(tensors, stats, image_stats, {**weights, "structural": 0.0}, 1.0, 8.0)
    top = scaled["logical"].amax(dim=(1, 2))
    torch.testing.assert_close(
        alone.amax(dim=(1, 2)), torch.maximum(top, scaled["composition"][:, 0, 0])
    )
    with pytest.raises(ValueError, match="image statistics"):
        max_fuse_maps(tensors, stats, {"logical": image_stats["logical"]}, weights, 1.0)
    with pytest.raises(ValueError, match="every branch has weight 0"):
        max_fuse_maps(tensors, stats, image_stats, dict.fromkeys(weights, 0.0), 1.0)


def test_a_weight_scales_evidence_not_the_background() -> None:
    z = torch.tensor([-3.0, -0.5, 0.0, 0.5, 4.0])
    torch.testing.assert_close(weigh_evidence(z, 0.5), torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0]))
    torch.testing.assert_close(weigh_evidence(z, 1.0), z)
    # a down-weighted branch whose map stays below its typical good-image peak keeps its place
    # among the others: a linear weight would lift its background towards 0, over their pixels
    maps, stats, image_stats, _ = max_fusion_case(12)
    tensors = {b: torch.from_numpy(maps[b]) for b in ("logical", "structural")}
    quiet = {**image_stats, "structural": BranchStats(10.0, 2.0)}  # every pixel below 0
    z = {
        b: (m - quiet[b].mean) / quiet[b].std
        for b, m in standardised_maps(tensors, stats, 1.0).items()
    }
    assert z["structural"].max() < 0
    fused = max_fuse_maps(tensors, stats, quiet, {"logical": 1.0, "structural": 0.25}, 1.0)
    torch.testing.assert_close(fused, torch.maximum(z["logical"], z["structural"]))
    linear = torch.maximum(z["logical"], 0.25 * z["structural"])
    assert (linear > fused + 1.0).float().mean() > 0.5


def test_a_capped_branch_shapes_the_map_but_never_raises_the_score() -> None:
    """positional_role="shape": the positional map is cut at what the image scores without it
    (the other map branches' peak, or the composition evidence where that is larger); below
    that the map is the plain maximum, and the image scores are those of the other branches
    (exactly, from the branch scores as from the maps)."""
    maps, stats, image_stats, weights = max_fusion_case(13)
    maps["positional"] = np.random.default_rng(3).random((3, 20, 20)).astype(np.float32)
    maps["positional"][1, 6, 6] = 40.0  # a positional peak far above the others in image 1
    maps["positional"][2, 9, 9] = 40.0  # and in image 2, whose composition evidence is larger
    stats["positional"], image_stats["positional"] = BranchStats(0.5, 0.2), BranchStats(1.0, 0.4)
    weights["positional"] = 1.0
    tensors = {b: torch.from_numpy(m) for b, m in maps.items()}
    standardised = standardised_maps(tensors, stats, 1.0)
    z = {
        b: weigh_evidence((standardised[b] - image_stats[b].mean) / image_stats[b].std, weights[b])
        for b in tensors
    }
    others = torch.maximum(z["logical"], z["structural"])
    score = torch.maximum(others.amax(dim=(1, 2), keepdim=True), z["composition"][:, :1, :1])
    got = max_fuse_maps(tensors, stats, image_stats, weights, 1.0, capped=("positional",))
    want = torch.maximum(
        torch.maximum(others, torch.minimum(z["positional"], score)), z["composition"]
    )
    torch.testing.assert_close(got, want)
    assert z["positional"][1].max() > score[1].max() + 10  # the cap bites on image 1
    assert score[2].max() > others[2].max() + 1  # image 2: the cap is its composition evidence
    assert got[2, 9, 9] == pytest.approx(float(score[2].max()))
    below = z["positional"] < score
    assert (got[below] >= z["positional"][below]).all()  # below the score it places evidence
    assert (z["positional"] > torch.maximum(others, z["composition"]))[below].any()
    scores = {b: image_scores(m) for b, m in standardised.items()}
    torch.testing.assert_close(
        max_fuse_scores(scores, image_stats, weights, ("positional",)),
        image_scores(got).double(),
        rtol=1e-5,
        atol=1e-5,
    )
    uncapped = max_fuse_scores(scores, image_stats, weights)
    assert uncapped[1] > image_scores(got)[1] + 10
    gated = max_fuse_maps(tensors, stats, image_stats, weights, 1.0, 8.0, ("positional",))
    torch.testing.assert_close(
        image_scores(gated).double(), max_fuse_scores(scores, image_stats, weights, ("positional",))
    )
    only = {"positional": tensors["positional"]}
    with pytest.raises(ValueError, match="need another map branch"):
        max_fuse_maps(only, stats, image_stats, weights, 1.0, capped=("positional",))


def test_positional_role_is_checked() -> None:
    assert FusionConfig(merge="max", positional_role="shape").capped == ("positional",)
    assert FusionConfig(merge="max").capped == ()
    # like image_scale, a setting of the max merge: the paper's sum sums every map
    assert FusionConfig(merge="sum", positional_role="shape").capped == ()
    with pytest.raises(ValueError, match="positional_role must be one of"):
        FusionConfig(merge="max", positional_role="map")


def test_standardised_maps_are_the_branch_alone_maps() -> None:
    maps, stats, _, _ = max_fusion_case(8)
    tensors = {b: torch.from_numpy(m) for b, m in maps.items()}
    got = standardised_maps(tensors, stats, 2.0)
    for branch, values in tensors.items():
        alone = fuse_maps({branch: values}, stats, {branch: 1.0}, 2.0)
        torch.testing.assert_close(got[branch], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no statistics"):
        standardised_maps(tensors, {"logical": stats["logical"]}, 2.0)


@pytest.mark.parametrize("scale", ["branch", "pooled"])
def test_image_stats_from_the_validation_maps(scale: str) -> None:
    maps, stats, _, _ = max_fusion_case(9)
    maps["structural"] = maps["structural"] * 3  # image-score spreads far apart: pooling shows
    chunks = [{b: torch.from_numpy(m[i : i + 2]) for b, m in maps.items()} for i in (0, 2)]
    got = fit_image_stats(chunks, stats, 1.5, scale)
    want = {}
    for branch, values in maps.items():
        z = (values.astype(np.float64) - stats[branch].mean) / stats[branch].std
        if branch != "composition":  # a constant per image: blurring changes nothing
            z = np.stack([gaussian_filter(image, sigma=1.5) for image in z])
        peaks = z.max(axis=(1, 2))
        want[branch] = (peaks.mean(), peaks.std())
    if scale == "pooled":
        pooled = np.sqrt((want["logical"][1] ** 2 + want["structural"][1] ** 2) / 2)
        want |= {b: (want[b][0], pooled) for b in ("logical", "structural")}
    assert abs(want["logical"][1] - want["structural"][1]) > 0.5 or scale == "pooled"
    for branch, (mean, std) in want.items():
        assert got[branch].as_tuple() == pytest.approx((mean, std), rel=1e-4, abs=1e-5)
    alone = fit_image_stats([{"logical": c["logical"]} for c in chunks], stats, 1.5, "pooled")
    assert alone["logical"].std == pytest.approx(fit_image_stats(chunks, stats, 1.5)["logical"].std)
    with pytest.raises(ValueError, match="image scale"):
        fit_image_stats(chunks, stats, 1.5, "median")


@pytest.mark.parametrize("composition_scale", ["std", "robust"])
def test_image_level_fusion_from_branch_scores(composition_scale: str) -> None:
    """What the accuracy benchmark records per branch (the maxima of the standardised maps)
    gives back the image stats and the fused image scores exactly (tools.accuracy_recombine)."""
    maps, stats, _, weights = max_fusion_case(11)
    tensors = {b: torch.from_numpy(m) for b, m in maps.items()}
    chunks = [{b: t[i : i + 2] for b, t in tensors.items()} for i in (0, 2)]
    standardised = standardised_maps(tensors, stats, 1.5)
    scores = {b: image_scores(m) for b, m in standardised.items()}
    image_stats = fit_image_stats(chunks, stats, 1.5, "pooled", composition_scale)
    from_scores = image_stats_from_scores(
        {b: [s[:2], s[2:]] for b, s in scores.items()}, "pooled", composition_scale
    )
    assert from_scores == image_stats
    fused = max_fuse_maps(tensors, stats, image_stats, weights, 1.5, 8.0)
    got = max_fuse_scores(scores, image_stats, weights)
    torch.testing.assert_close(got, image_scores(fused).double(), rtol=1e-5, atol=1e-5)
    alone = max_fuse_scores(scores, image_stats, {**weights, "logical": 0.0})
    torch.testing.assert_close(
        alone,
        torch.maximum(
            *(
                weigh_evidence(
                    (scores[b].double() - image_stats[b].mean) / image_stats[b].std, weights[b]
                )
                for b in ("structural", "composition")
            )
        ),
    )
    with pytest.raises(ValueError, match="every branch has weight 0"):
        max_fuse_scores(scores, image_stats, dict.fromkeys(weights, 0.0))
    with pytest.raises(ValueError, match="image scale"):
        image_stats_from_scores(scores, "median")


def eight_image_case(composition: np.ndarray) -> tuple[list[dict], dict[str, BranchStats]]:
    """Validation maps of 8 images in two chunks, composition scores given, and pixel stats."""
    rng = np.random.default_rng(9)
    maps = {b: rng.random((8, 20, 20)).astype(np.float32) for b in ("logical", "structural")}
    maps["composition"] = np.broadcast_to(composition[:, None, None], (8, 20, 20)).copy()
    stats = {b: BranchStats(0.5, 0.3) for b in ("logical", "structural")}
    stats["composition"] = BranchStats(0.0, 1.0)
    return [{b: torch.from_numpy(m[i : i + 4]) for b, m in maps.items()} for i in (0, 4)], stats


def test_robust_composition_stats_ignore_a_few_far_validation_layouts() -> None:
    """composition_scale="robust": the composition branch's median and 1.4826 x MAD; the
    map branches keep their moments."""
    scores = np.array([0.1, -0.2, 0.0, 0.3, -0.1, 0.2, 6.0, 4.0])  # two far but normal layouts
    chunks, stats = eight_image_case(scores)
    moments = fit_image_stats(chunks, stats, 1.5, "pooled")
    robust = fit_image_stats(chunks, stats, 1.5, "pooled", "robust")
    median = np.median(scores)
    mad = 1.4826 * np.median(np.abs(scores - median))
    assert robust["composition"].as_tuple() == pytest.approx((median, mad))
    assert moments["composition"].as_tuple() == pytest.approx((scores.mean(), scores.std()))
    assert robust["composition"].std < moments["composition"].std / 5
    for branch in ("logical", "structural"):
        assert robust[branch] == moments[branch]
    with pytest.raises(ValueError, match="composition scale"):
        fit_image_stats(chunks, stats, 1.5, "pooled", "mad")


def test_robust_stats_fall_back_to_moments_without_a_deviation() -> None:
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 2.0, 3.0, 0.5])  # median deviation 0
    chunks, stats = eight_image_case(scores)
    got = fit_image_stats(chunks, stats, 1.5, "branch", "robust")["composition"]
    assert got.as_tuple() == pytest.approx((scores.mean(), scores.std()))


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
    ):
        with pytest.raises(ValueError):
            FusionConfig(**kwargs)
