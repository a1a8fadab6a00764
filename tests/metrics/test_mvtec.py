import numpy as np
import pytest
from scipy import ndimage

from engine.metrics.curve import trapezoid
from engine.metrics.mvtec import compute_mvtec_metrics


def hand_made_case():
    """One anomalous image with two 8-connected regions and one good image.

    Region 1 is the diagonal pair (0, 0) = 0.9, (1, 1) = 0.5 (two regions under 4-connectivity);
    region 2 is (3, 3) = 0.7. Defect-free pixels: (2, 0) = 0.6 in the anomalous image, (1, 1) = 0.8
    in the good one, the other 27 are 0.
    """
    anomalous = np.zeros((4, 4), dtype=np.float32)
    anomalous[0, 0], anomalous[1, 1], anomalous[3, 3] = 0.9, 0.5, 0.7
    anomalous[2, 0] = 0.6
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    good = np.zeros((4, 4), dtype=np.float32)
    good[1, 1] = 0.8
    return [anomalous, good], [mask, None]


def test_pro_on_hand_made_case():
    maps, masks = hand_made_case()
    result = compute_mvtec_metrics(maps, masks)
    # Points (FPR, PRO): (0, .25) from t = .9, (1/29, .25), (1/29, .75) at t = .7, (2/29, .75),
    # (2/29, 1) at t = .5, then flat to FPR 1. Area to 0.3 = .25/29 + .75/29 + (0.3 - 2/29).
    assert result.au_pro == pytest.approx((0.3 - 1 / 29) / 0.3, abs=1e-12)
    assert result.integration_limit == 0.3
    # Defective .9, .7, .5 against negatives {.8, .6, 27 × 0} beat 29, 28 and 27 of them.
    assert result.pixel_auroc == pytest.approx((29 + 28 + 27) / 87)
    assert result.image_auroc == 1.0 and result.image_auroc_official == 1.0


def brute_force_au_pro(maps, masks, limit):
    """Every distinct score as a threshold, ``score >= t``, regions from scipy (slow, plain)."""
    regions = []  # (map, region mask) per 8-connected region
    free = []
    for anomaly_map, mask in zip(maps, masks):
        mask = np.zeros(anomaly_map.shape, bool) if mask is None else mask
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(anomaly_map, labels == r) for r in range(1, count + 1)]
        free.append(anomaly_map[~mask])
    free = np.concatenate(free)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        pro = np.mean([np.mean(m[region] >= t) for m, region in regions])
        points.append((np.mean(free >= t), pro))
    points.append((1.0, 1.0))
    fpr, pro = np.array(points).T
    return trapezoid(fpr, pro, limit) / limit


def brute_force_pixel_auroc(maps, masks):
    labels = np.concatenate(
        [
            (mask if mask is not None else np.zeros(m.shape, bool)).ravel()
            for m, mask in zip(maps, masks)
        ]
    )
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    pos, neg = scores[labels], scores[~labels]
    return np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))


def random_case(seed, levels=None):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for k in range(5):
        anomaly_map = rng.random((9, 11))
        mask = None
        if k % 2:
            mask = rng.random((9, 11)) < 0.15  # scattered: many regions, some diagonal
            anomaly_map[mask] += 0.4
        if levels is not None:
            anomaly_map = np.round(anomaly_map * levels) / levels
        maps.append(anomaly_map)
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 6])
def test_pro_and_pixel_auroc_equal_brute_force(seed, levels):
    maps, masks = random_case(seed, levels)
    result = compute_mvtec_metrics(maps, masks)
    for limit in (0.3, 0.05, 1.0):
        got = compute_mvtec_metrics(maps, masks, integration_limit=limit).au_pro
        assert got == pytest.approx(brute_force_au_pro(maps, masks, limit), abs=1e-12)
    assert result.pixel_auroc == pytest.approx(brute_force_pixel_auroc(maps, masks), abs=1e-12)
    curve = result.pro_curve
    assert curve.fpr[0] == 0 and curve.fpr[-1] == 1 and curve.pro[-1] == 1
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.pro) >= 0)


def test_image_auroc_uses_the_map_maximum():
    # Image maxima: good .3, .3, .3 and anomalous .5, .7 (reference notes §2.6 example).
    maps = [np.full((3, 3), 0.3) for _ in range(3)] + [np.zeros((3, 3)), np.zeros((3, 3))]
    maps[3][1, 1], maps[4][2, 2] = 0.5, 0.7
    masks = [None] * 3 + [np.eye(3, dtype=bool)] * 2
    result = compute_mvtec_metrics(maps, masks)
    assert result.image_auroc == 1.0
    assert result.image_auroc_official == pytest.approx(5 / 6)


def test_only_good_images_give_none():
    result = compute_mvtec_metrics([np.zeros((3, 3)), np.ones((3, 3))], [None, None])
    assert result.image_auroc is None and result.pixel_auroc is None
    assert result.au_pro is None and result.pro_curve is None


@pytest.mark.parametrize(
    ("maps", "masks", "kwargs", "message"),
    [
        ([np.zeros((3, 3))], [None, None], {}, "got 1 maps but 2 masks"),
        ([], [], {}, "at least one image"),
        ([np.zeros(9)], [None], {}, "must be 2-D"),
        ([np.full((3, 3), np.nan)], [None], {}, "NaN or Inf"),
        ([np.zeros((3, 3), dtype=complex)], [None], {}, "real numbers"),
        ([np.zeros((3, 3))], [np.zeros((3, 3), dtype=np.uint8)], {}, "must be bool"),
        ([np.zeros((3, 3))], [np.zeros((3, 4), dtype=bool)], {}, "must be bool"),
        ([np.zeros((3, 3))], [None], {"integration_limit": 0.0}, "integration_limit"),
        ([np.zeros((3, 3))], [None], {"integration_limit": 1.5}, "integration_limit"),
    ],
)
def test_bad_inputs_are_refused(maps, masks, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_mvtec_metrics(maps, masks, **kwargs)
