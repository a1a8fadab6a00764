import json

import numpy as np
import pytest

import engine.metrics.loco as loco
from engine.data.types import GOOD, LOGICAL, STRUCTURAL, DefectSpec, GroundTruthChannel
from engine.metrics.curve import trapezoid
from engine.metrics.loco import MAX_FPRS, LocoEvaluator, compute_loco_metrics


def brute_force_point(maps, types, channels, subset, threshold, defect=None):
    """(FPR, mean sPRO) of a subset at one threshold, straight from the definitions; with
    ``defect``, the mean over that defect's channels only (the FPR is the subset's)."""
    false_positives = defect_free = 0
    spros = []
    for anomaly_map, kind, image_channels in zip(maps, types, channels):
        if kind not in (GOOD, subset):
            continue
        positive = anomaly_map.astype(np.float64) > threshold
        union = np.zeros(anomaly_map.shape, dtype=bool)
        for channel in image_channels:
            union |= channel.mask
            if defect is not None and channel.defect.name != defect:
                continue
            spros.append(min(np.sum(positive & channel.mask) / channel.saturation_area, 1.0))
        false_positives += np.sum(positive & ~union)
        defect_free += np.sum(~union)
    return false_positives / defect_free, float(np.mean(spros))


def exhaustive_au_spro(maps, types, channels, subset, defect=None):
    """{limit: AU-sPRO} with every distinct score as a threshold (slow, obviously complete)."""
    scores = np.unique(np.concatenate([m.ravel() for m in maps]).astype(np.float64))
    thresholds = np.concatenate([[scores[-1] + 1], scores[::-1], [scores[0] - 1]])
    points = [brute_force_point(maps, types, channels, subset, t, defect) for t in thresholds]
    fpr, spro = np.array(points).T
    return {limit: trapezoid(fpr, spro, limit) / limit for limit in MAX_FPRS}


def random_case(seed, height=10, width=12, num_images=6, levels=None):
    """Small random maps with 1-2 box channels of random saturation per anomalous image."""
    rng = np.random.default_rng(seed)
    maps, types, channels = [], [], []
    for k in range(num_images):
        kind = (GOOD, LOGICAL, STRUCTURAL)[k % 3]
        anomaly_map = rng.random((height, width)).astype(np.float32)
        image_channels = []
        for _ in range(0 if kind == GOOD else rng.integers(1, 3)):
            mask = np.zeros((height, width), dtype=bool)
            r, c = rng.integers(0, height - 3), rng.integers(0, width - 3)
            mask[r : r + rng.integers(2, 4), c : c + rng.integers(1, 4)] = True
            anomaly_map[mask] += rng.random() * 0.8
            if rng.random() < 0.5:
                spec = DefectSpec("absolute", 255, int(rng.integers(1, 6)), False)
            else:
                spec = DefectSpec("relative", 254, float(rng.choice([1.0, 0.5])), True)
            image_channels.append(GroundTruthChannel(mask, spec))
        if levels is not None:  # quantised maps: many tied scores
            anomaly_map = np.round(anomaly_map * levels) / levels
        maps.append(anomaly_map)
        types.append(kind)
        channels.append(tuple(image_channels))
    return maps, types, channels


def test_reference_case_matches_official(loco_case, reference_au_spro):
    result = compute_loco_metrics(loco_case.maps, loco_case.types, loco_case.channels)
    for key, expected in reference_au_spro.items():
        got = [result.auc_spro[key][limit] for limit in MAX_FPRS]
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=key)
    # The official refinement chose 431 thresholds on this case.
    assert result.thresholds.size == 431
    # Three tied good maxima: the official quirk gives 5/6 although the ranking is perfect.
    for key in (LOGICAL, STRUCTURAL, "mean"):
        assert result.auroc[key] == pytest.approx(5 / 6, abs=1e-12)
        assert result.auroc_tie_correct[key] == 1.0


def test_reference_case_in_float32(loco_case, reference_au_spro):
    maps = [m.astype(np.float32) for m in loco_case.maps]
    result = compute_loco_metrics(maps, loco_case.types, loco_case.channels)
    got = [result.auc_spro["mean"][limit] for limit in MAX_FPRS]
    np.testing.assert_allclose(got, reference_au_spro["mean"], atol=1e-6)


def test_official_json_shape(loco_case):
    result = compute_loco_metrics(loco_case.maps, loco_case.types, loco_case.channels)
    content = result.to_official_json()
    json.dumps(content)  # plain JSON types only
    assert set(content) == {"classification", "localization"}
    assert set(content["classification"]) == {"auc_roc", "auc_roc_tie_correct"}
    assert set(content["classification"]["auc_roc"]) == {LOGICAL, STRUCTURAL, "mean"}
    spro = content["localization"]["auc_spro"]
    assert set(spro) == {LOGICAL, STRUCTURAL, "mean"}
    assert list(spro["mean"]) == ["0.01", "0.05", "0.1", "0.3", "1.0"]
    assert spro[LOGICAL]["0.05"] == result.auc_spro[LOGICAL][0.05]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 8])
def test_curve_points_equal_brute_force(seed, levels):
    maps, types, channels = random_case(seed, levels=levels)
    result = compute_loco_metrics(maps, types, channels)
    for subset in (LOGICAL, STRUCTURAL):
        curve = result.spro_curves[subset]
        assert np.all(np.diff(curve.thresholds) < 0)
        assert curve.fpr[0] == 0 and curve.fpr[-1] == 1
        assert curve.spro[0] == 0 and curve.spro[-1] == 1
        # float32 maps against float64 refinement midpoints: counts must follow `score > t`.
        for k in range(0, curve.thresholds.size, 7):
            fpr, spro = brute_force_point(maps, types, channels, subset, curve.thresholds[k])
            assert (curve.fpr[k], curve.spro[k]) == (pytest.approx(fpr, abs=1e-15), spro)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 8])
def test_adaptive_thresholds_agree_with_exhaustive(seed, levels):
    maps, types, channels = random_case(seed, levels=levels)
    result = compute_loco_metrics(maps, types, channels)
    for subset in (LOGICAL, STRUCTURAL):
        expected = exhaustive_au_spro(maps, types, channels, subset)
        for limit in MAX_FPRS:
            assert result.auc_spro[subset][limit] == pytest.approx(expected[limit], abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_per_defect_au_spro_is_each_defects_part_of_its_subset(seed):
    """Each defect's AU-sPRO agrees with the exhaustive one over its channels at the subset's
    FPR, and the subset's is their channel-count-weighted mean."""
    maps, types, channels = random_case(seed, num_images=12)
    result = compute_loco_metrics(maps, types, channels)
    for subset in (LOGICAL, STRUCTURAL):
        names = [c.defect.name for t, cs in zip(types, channels) if t == subset for c in cs]
        per_defect = result.auc_spro_per_defect[subset]
        assert sorted(per_defect) == sorted(set(names)) == ["absolute", "relative"]
        for name, values in per_defect.items():
            expected = exhaustive_au_spro(maps, types, channels, subset, name)
            for limit in MAX_FPRS:
                assert values[limit] == pytest.approx(expected[limit], abs=1e-9)
        for limit in MAX_FPRS:
            weighted = sum(names.count(n) * v[limit] for n, v in per_defect.items()) / len(names)
            assert weighted == pytest.approx(result.auc_spro[subset][limit], abs=1e-12)


def test_fpr_excludes_ground_truth_pixels():
    good = np.zeros((4, 4))
    anomalous = np.zeros((4, 4))
    anomalous[:2, :2] = 1.0  # the defect, fully detected
    anomalous[3, 3] = 0.5  # one false positive outside it
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    channel = GroundTruthChannel(mask, DefectSpec("d", 255, 1.0, True))
    result = compute_loco_metrics([good, anomalous], [GOOD, LOGICAL], [(), (channel,)])
    curve = result.spro_curves[LOGICAL]
    # 16 + 12 defect-free pixels; the 4 detected defect pixels are never false positives.
    assert set(zip(curve.fpr.tolist(), curve.spro.tolist())) == {
        (0.0, 0.0),
        (0.0, 1.0),
        (1 / 28, 1.0),
        (1.0, 1.0),
    }
    assert result.spro_curves.keys() == {LOGICAL}
    assert result.auc_spro[STRUCTURAL][0.05] is None
    assert result.auc_spro["mean"][0.05] is None


def test_overlapping_channels_count_their_own_pixels():
    anomaly_map = np.zeros((4, 6))
    anomaly_map[:, :4] = 1.0
    first = np.zeros((4, 6), dtype=bool)
    first[:, :4] = True
    second = np.zeros((4, 6), dtype=bool)
    second[:, 2:] = True  # half inside the detection, overlapping the first channel
    spec = DefectSpec("d", 255, 1.0, True)
    channels = (GroundTruthChannel(first, spec), GroundTruthChannel(second, spec))
    result = compute_loco_metrics(
        [np.zeros((4, 6)), anomaly_map], [GOOD, STRUCTURAL], [(), channels]
    )
    curve = result.spro_curves[STRUCTURAL]
    at_half = np.flatnonzero((curve.thresholds < 1.0) & (curve.thresholds > 0.0))
    np.testing.assert_allclose(curve.spro[at_half], 0.5 * (1.0 + 0.5))
    np.testing.assert_allclose(curve.fpr[at_half], 0.0)  # the union covers every detection


@pytest.mark.parametrize(
    ("spec", "area", "saturation"),
    [
        (DefectSpec("abs", 255, 30, False), 16, 16),  # threshold above the area: the area
        (DefectSpec("abs", 255, 4, False), 16, 4),
        (DefectSpec("rel", 254, 0.5, True), 9, 4),  # int(4.5) truncates
        (DefectSpec("rel", 254, 1.0, True), 9, 9),
    ],
)
def test_saturation_rules(spec, area, saturation):
    assert spec.saturation_area(area) == saturation
    # Scores 1..area inside the channel: k pixels lie above threshold area - k + 0.5.
    anomaly_map = np.zeros((1, 20))
    anomaly_map[0, :area] = np.arange(1, area + 1)
    mask = anomaly_map > 0
    channel = GroundTruthChannel(mask, spec)
    result = compute_loco_metrics(
        [np.zeros((1, 20)), anomaly_map], [GOOD, LOGICAL], [(), (channel,)]
    )
    curve = result.spro_curves[LOGICAL]
    for threshold, spro in zip(curve.thresholds, curve.spro):
        detected = int(np.sum(anomaly_map[mask] > threshold))
        assert spro == min(detected / saturation, 1.0)
    assert min(curve.spro[curve.spro > 0]) == pytest.approx(min(1 / saturation, 1.0))


def test_zero_saturation_area_is_refused():
    mask = np.zeros((3, 3), dtype=bool)
    mask[1, 1] = True  # area 1, relative 0.5 -> int(0.5) = 0
    channel = GroundTruthChannel(mask, DefectSpec("rel", 254, 0.5, True))
    with pytest.raises(ValueError, match="saturation area 0"):
        LocoEvaluator().add(np.zeros((3, 3)), LOGICAL, [channel], name="x.tiff")


def test_constant_maps_do_not_crash():
    # Every score tied: the official script fails its duplicate-threshold assertion.
    maps, types, channels = random_case(0)
    flat = [np.full_like(m, 0.25) for m in maps]
    result = compute_loco_metrics(flat, types, channels)
    assert np.all(np.diff(result.thresholds) < 0)  # refined, but never a repeated threshold
    for subset in (LOGICAL, STRUCTURAL):
        assert result.auc_spro[subset][1.0] == pytest.approx(0.5)  # the diagonal
        assert result.auc_spro[subset][0.05] == pytest.approx(0.025)
        assert result.auroc_tie_correct[subset] == 0.5


def test_clipped_maps_match_exhaustive():
    maps, types, channels = random_case(1)
    clipped = [np.clip(m, 0.3, 0.7) for m in maps]
    result = compute_loco_metrics(clipped, types, channels)
    expected = exhaustive_au_spro(clipped, types, channels, LOGICAL)
    assert result.auc_spro[LOGICAL][0.3] == pytest.approx(expected[0.3], abs=1e-9)


def test_sampling_above_the_score_budget(monkeypatch):
    maps, types, channels = random_case(2)
    full = compute_loco_metrics(maps, types, channels)
    monkeypatch.setattr(loco, "MAX_SAMPLED_SCORES", 200)  # 6 maps x 120 > 200: sample 33 each
    first = compute_loco_metrics(maps, types, channels, seed=1)
    again = compute_loco_metrics(maps, types, channels, seed=1)
    np.testing.assert_array_equal(first.thresholds, again.thresholds)
    assert not np.array_equal(first.thresholds, full.thresholds)
    for subset in (LOGICAL, STRUCTURAL):
        for limit in MAX_FPRS:
            assert first.auc_spro[subset][limit] == pytest.approx(
                full.auc_spro[subset][limit], abs=1e-9
            )


def test_no_defect_free_pixel_gives_null_localization():
    mask = np.ones((2, 2), dtype=bool)
    channel = GroundTruthChannel(mask, DefectSpec("d", 255, 1.0, True))
    result = compute_loco_metrics([np.ones((2, 2))], [LOGICAL], [(channel,)])
    assert all(value is None for value in result.auc_spro[LOGICAL].values())
    assert result.auroc[LOGICAL] is None  # no good image either
    assert result.thresholds.size == 0


def test_image_scores_are_map_maxima(loco_case):
    result = compute_loco_metrics(loco_case.maps, loco_case.types, loco_case.channels)
    np.testing.assert_array_equal(result.image_scores[GOOD], [m.max() for m in loco_case.maps[:3]])
    roc = result.roc_curves[LOGICAL]
    assert trapezoid(roc.fpr, roc.tpr) == pytest.approx(result.auroc_tie_correct[LOGICAL])


def _channel(shape=(3, 3)):
    mask = np.zeros(shape, dtype=bool)
    mask[0, 0] = True
    return GroundTruthChannel(mask, DefectSpec("d", 255, 1.0, True))


@pytest.mark.parametrize(
    ("anomaly_map", "kind", "channels", "message"),
    [
        (np.zeros((3, 3, 1)), GOOD, (), "must be 2-D"),
        (np.zeros((3, 3), dtype=complex), GOOD, (), "real numbers"),
        (np.full((3, 3), np.nan), GOOD, (), "NaN or Inf"),
        (np.zeros((3, 3)), "scratches", (), "defect type"),
        (np.zeros((3, 3)), GOOD, (_channel(),), "no ground-truth channel"),
        (np.zeros((3, 3)), LOGICAL, (), "needs ground-truth channels"),
        (np.zeros((3, 3)), LOGICAL, (_channel((3, 4)),), "bool mask of the map's shape"),
        (np.zeros((3, 3)), LOGICAL, (GroundTruthChannel(np.zeros((3, 3), bool)),), "empty"),
    ],
)
def test_bad_images_are_refused(anomaly_map, kind, channels, message):
    with pytest.raises(ValueError, match=message) as error:
        LocoEvaluator().add(anomaly_map, kind, channels, name="maps/x/007.tiff")
    assert "007.tiff" in str(error.value)


def test_maps_of_different_shapes_are_refused():
    evaluator = LocoEvaluator()
    evaluator.add(np.zeros((3, 3)), GOOD)
    with pytest.raises(ValueError, match="share one shape"):
        evaluator.add(np.zeros((3, 4)), GOOD)


def test_compute_needs_an_anomalous_image():
    evaluator = LocoEvaluator()
    evaluator.add(np.zeros((3, 3)), GOOD)
    with pytest.raises(ValueError, match="at least one anomalous"):
        evaluator.compute()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_fprs": (0.0,)}, "integration limits"),
        ({"max_fprs": (1.5,)}, "integration limits"),
        ({"curve_max_distance": 0.0}, "curve_max_distance"),
    ],
)
def test_bad_compute_arguments_are_refused(loco_case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_loco_metrics(loco_case.maps, loco_case.types, loco_case.channels, **kwargs)


def test_mismatched_inputs_are_refused(loco_case):
    with pytest.raises(ValueError):
        compute_loco_metrics(loco_case.maps, loco_case.types[:-1], loco_case.channels)
