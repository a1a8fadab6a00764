"""The max merge (engine.max_merge) against independent numpy: the fused map, its image
scores from branch scores, image statistics, evidence weights, capped branches and background
scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from engine.calibrate import BranchStats, fuse_maps, image_scores, standardised_maps
from engine.max_merge import (
    fit_background_scales,
    fit_image_stats,
    image_stats_from_scores,
    mark_absence,
    max_fuse_maps,
    max_fuse_scores,
    weigh_evidence,
)


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


def test_placement_widens_the_gate_and_keeps_the_image_score() -> None:
    """``placement_power``: the composition evidence also goes where the placement map says,
    the gate the larger of the peak gate and the placement rescaled to [0, 1] ** power."""
    maps, stats, image_stats, weights = max_fusion_case()
    tensors = {b: torch.from_numpy(m) for b, m in maps.items()}
    rng = np.random.default_rng(3)
    placement = rng.random((3, 20, 20)).astype(np.float32)
    placement[1] = 0.25  # flat: it places nothing, the peak gate alone decides
    plain = max_fuse_maps(tensors, stats, image_stats, weights, 1.5, 8.0).numpy()
    got = max_fuse_maps(
        tensors,
        stats,
        image_stats,
        weights,
        1.5,
        8.0,
        placement=torch.from_numpy(placement),
        placement_power=4.0,
    ).numpy()
    base = max_fuse_maps(tensors, stats, image_stats, {**weights, "composition": 0.0}, 1.5)
    base = base.numpy()
    top = base.max((1, 2), keepdims=True)
    peak = ((base - base.min((1, 2), keepdims=True)) / np.ptp(base, (1, 2), keepdims=True)) ** 8
    low = placement.min((1, 2), keepdims=True)
    span = np.maximum(np.ptp(placement, (1, 2), keepdims=True), 1e-12)
    placed = ((placement - low) / span) ** 4
    lift = np.maximum(plain.max((1, 2), keepdims=True) - top, 0.0)
    np.testing.assert_allclose(got, base + lift * np.maximum(peak, placed), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.max((1, 2)), plain.max((1, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], plain[1])
    assert lift[2, 0, 0] > 0 and (got[2] > plain[2] + 1e-3).mean() > 0.05  # image 2 spreads
    with pytest.raises(ValueError, match="placement_power needs gate_power"):
        max_fuse_maps(tensors, stats, image_stats, weights, 1.5, placement_power=4.0)
    with pytest.raises(ValueError, match="placement map"):
        max_fuse_maps(tensors, stats, image_stats, weights, 1.5, 8.0, placement_power=4.0)


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


def test_standardised_maps_are_the_branch_alone_maps() -> None:
    maps, stats, _, _ = max_fusion_case(8)
    tensors = {b: torch.from_numpy(m) for b, m in maps.items()}
    got = standardised_maps(tensors, stats, 2.0)
    for branch, values in tensors.items():
        alone = fuse_maps({branch: values}, stats, {branch: 1.0}, 2.0)
        torch.testing.assert_close(got[branch], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no statistics"):
        standardised_maps(tensors, {"logical": stats["logical"]}, 2.0)


def test_a_background_scale_moves_only_what_lies_below_the_peak() -> None:
    z = torch.tensor([-3.0, -0.5, 0.0, 0.5, 4.0])
    torch.testing.assert_close(
        weigh_evidence(z, 2.0, 0.5), torch.tensor([-1.5, -0.25, 0.0, 1.0, 8.0])
    )


def background_case() -> tuple[list[dict], dict, dict, dict]:
    """Validation maps (two chunks) whose branches' backgrounds reach their peaks unequally."""
    rng = np.random.default_rng(21)
    maps = {
        "logical": rng.normal(0.0, 1.0, (6, 24, 24)),  # broad: close under its peak
        "structural": rng.normal(0.0, 1.0, (6, 24, 24)) ** 3,  # heavy-tailed: quiet background
        "positional": rng.normal(0.0, 1.0, (6, 24, 24)),
        "composition": np.repeat(rng.normal(size=(6, 1, 1)), 24, 1).repeat(24, 2),
    }
    tensors = {b: torch.from_numpy(m.astype(np.float32)) for b, m in maps.items()}
    chunks = [{b: t[i : i + 3] for b, t in tensors.items()} for i in (0, 3)]
    stats = {b: BranchStats.fit([t]) for b, t in tensors.items()}
    image_stats = fit_image_stats(chunks, stats, 1.0)
    weights = {"logical": 1.0, "structural": 2.0, "positional": 1.0, "composition": 1.0}
    return chunks, stats, image_stats, weights


def test_background_scales_equalise_the_validation_quantile() -> None:
    """Each map branch's quantile lands on the branches' mean of it, recomputed in numpy; the
    composition branch keeps 1, and so does a branch of weight 0."""
    chunks, stats, image_stats, weights = background_case()
    scales = fit_background_scales(chunks, stats, image_stats, weights, 1.0, 0.95)
    assert set(scales) == set(weights) and scales["composition"] == 1.0
    tails = {}
    for branch in ("logical", "structural", "positional"):
        whole = torch.cat([c[branch] for c in chunks])
        z = (
            standardised_maps({branch: whole}, stats, 1.0)[branch].double().numpy()
            - image_stats[branch].mean
        ) / image_stats[branch].std
        z = np.where(z > 0, weights[branch] * z, z)
        tails[branch] = np.quantile(z, 0.95)
        assert tails[branch] < 0
    target = np.mean(list(tails.values()))
    for branch, tail in tails.items():
        assert scales[branch] == pytest.approx(target / tail, rel=1e-6)
    assert max(scales.values()) / min(scales.values()) > 1.2  # the case really is unequal
    dropped = fit_background_scales(
        chunks, stats, image_stats, {**weights, "positional": 0.0}, 1.0, 0.95
    )
    assert dropped["positional"] == 1.0
    pair = [tails["logical"], tails["structural"]]
    assert dropped["logical"] == pytest.approx(np.mean(pair) / tails["logical"], rel=1e-6)


def test_the_lowest_target_pushes_backgrounds_down_and_lifts_none() -> None:
    chunks, stats, image_stats, weights = background_case()
    mean = fit_background_scales(chunks, stats, image_stats, weights, 1.0, 0.95)
    lowest = fit_background_scales(chunks, stats, image_stats, weights, 1.0, 0.95, "lowest")
    assert lowest["composition"] == 1.0
    maps = {b: lowest[b] for b in ("logical", "structural", "positional")}
    assert min(maps.values()) == 1.0 and all(s >= 1.0 for s in maps.values())
    assert min(mean.values()) < 1.0  # the mean target lifts the quietest background
    quietest = min(maps, key=lambda b: mean[b])  # the one the mean target lifts most
    assert maps[quietest] == 1.0
    for branch, scale in maps.items():  # same branch ordering, shifted by one common factor
        assert scale == pytest.approx(mean[branch] / mean[quietest], rel=1e-9)
    with pytest.raises(ValueError, match="background target must be one of"):
        fit_background_scales(chunks, stats, image_stats, weights, 1.0, 0.95, "median")


def test_background_scales_need_two_backgrounds_and_a_quantile_inside() -> None:
    chunks, stats, image_stats, weights = background_case()
    alone = {**weights, "structural": 0.0, "positional": 0.0}
    scales = fit_background_scales(chunks, stats, image_stats, alone, 1.0, 0.95)
    assert set(scales.values()) == {1.0}
    for quantile in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="background quantile must lie in"):
            fit_background_scales(chunks, stats, image_stats, weights, 1.0, quantile)


def test_background_scales_in_the_map_and_its_scores() -> None:
    """The fused map with background scales is the formula's, and its image scores follow
    from the branches' scores exactly (positional cut as with positional_role="shape")."""
    chunks, stats, image_stats, weights = background_case()
    maps = {b: torch.cat([c[b] for c in chunks]) for b in chunks[0]}
    scales = fit_background_scales(chunks, stats, image_stats, weights, 1.0, 0.95)
    plain = {b: m for b, m in maps.items() if b != "composition"}
    got = max_fuse_maps(plain, stats, image_stats, weights, 1.0, backgrounds=scales)
    standardised = standardised_maps(plain, stats, 1.0)
    want = torch.stack(
        [
            weigh_evidence((m - image_stats[b].mean) / image_stats[b].std, weights[b], scales[b])
            for b, m in standardised.items()
        ]
    ).amax(dim=0)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, max_fuse_maps(plain, stats, image_stats, weights, 1.0))
    fused = max_fuse_maps(maps, stats, image_stats, weights, 1.0, 8.0, ("positional",), scales)
    scores = {b: image_scores(m) for b, m in standardised_maps(maps, stats, 1.0).items()}
    from_scores = max_fuse_scores(scores, image_stats, weights, ("positional",), scales)
    torch.testing.assert_close(from_scores, image_scores(fused).double(), rtol=1e-5, atol=1e-5)


def test_the_absence_mark_lifts_only_above_its_peak_and_keeps_the_image_score() -> None:
    rng = np.random.default_rng(9)
    fused = rng.normal(size=(3, 12, 12)).astype(np.float32)
    absence = (3 * rng.normal(size=(3, 12, 12))).astype(np.float32)
    got = mark_absence(torch.from_numpy(fused), torch.from_numpy(absence), 0.5).numpy()
    peak = fused.max(axis=(1, 2), keepdims=True)
    want = np.where(absence > 0, np.maximum(fused, np.minimum(0.5 * absence, peak)), fused)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got.max(axis=(1, 2)), fused.max(axis=(1, 2)))
    assert (got > fused).any()
    np.testing.assert_array_equal(got[absence <= 0], fused[absence <= 0])
