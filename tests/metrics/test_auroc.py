import numpy as np
import pytest

from engine.metrics.auroc import (
    auroc,
    auroc_official,
    auroc_standard_error,
    roc_curve,
    roc_points_official,
)
from engine.metrics.curve import trapezoid


def brute_force_auroc(negatives, positives):
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs)


def test_official_tie_quirk_underestimates():
    # Reference notes §2.6, checked by running the official code.
    negatives, positives = [0.3, 0.3, 0.3], [0.5, 0.7]
    assert auroc_official(negatives, positives) == pytest.approx(5 / 6, abs=1e-12)
    assert auroc(negatives, positives) == 1.0


def test_official_tie_quirk_overestimates():
    negatives, positives = [0.1, 0.2, 0.3], [0.3, 0.7]
    assert auroc_official(negatives, positives) == pytest.approx(1.0, abs=1e-12)
    assert auroc(negatives, positives) == pytest.approx(11 / 12, abs=1e-12)


def test_official_points_follow_the_quirk():
    fpr, tpr = roc_points_official([0.3, 0.3, 0.3], [0.5, 0.7])
    # Start (1, 1); after the first tied good only (2/3 of the goods left); after each
    # positive. The other two goods never get a point of their own.
    np.testing.assert_allclose(fpr, [0.0, 0.0, 2 / 3, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_without_ties_both_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    negatives, positives = rng.normal(size=17), rng.normal(0.8, size=11)
    expected = brute_force_auroc(negatives, positives)
    assert auroc(negatives, positives) == pytest.approx(expected, abs=1e-12)
    assert auroc_official(negatives, positives) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_tie_correct_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    negatives, positives = rng.integers(0, 4, 23), rng.integers(1, 5, 9)
    expected = brute_force_auroc(negatives, positives)
    assert auroc(negatives, positives) == pytest.approx(expected, abs=1e-12)
    assert trapezoid(*roc_curve(negatives, positives)) == pytest.approx(expected, abs=1e-12)


def test_roc_curve_runs_from_origin_to_one():
    fpr, tpr = roc_curve([0.1, 0.4], [0.35, 0.8])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])


@pytest.mark.parametrize(
    ("negatives", "positives", "message"),
    [
        ([], [0.5], "at least one negative"),
        ([0.1], [], "at least one positive"),
        ([0.1, np.nan], [0.5], "NaN or Inf"),
        ([0.1], [np.inf], "NaN or Inf"),
        (["a"], [0.5], "real numbers"),
        (np.array([1j]), [0.5], "real numbers"),
    ],
)
def test_bad_scores_are_refused(negatives, positives, message):
    for metric in (auroc, auroc_official):
        with pytest.raises(ValueError, match=message):
            metric(negatives, positives)


@pytest.mark.parametrize(("area", "negatives", "positives"), [(0.8, 20, 20), (0.9, 100, 100)])
def test_standard_error_matches_the_spread_of_resampled_aurocs(area, negatives, positives):
    # Binormal scores with this AUROC: d' = sqrt(2) * probit(area).
    shift = np.sqrt(2) * {0.8: 0.8416212, 0.9: 1.2815516}[area]
    rng = np.random.default_rng(0)
    values = [
        auroc(rng.normal(size=negatives), rng.normal(shift, size=positives)) for _ in range(2000)
    ]
    # Hanley-McNeil assumes exponential scores; on binormal ones it is within about 10 %.
    assert auroc_standard_error(area, negatives, positives) == pytest.approx(
        np.std(values), rel=0.15
    )


def test_standard_error_shrinks_with_the_test_set():
    assert auroc_standard_error(0.8, 100, 100) < auroc_standard_error(0.8, 20, 20) / 2
    assert auroc_standard_error(1.0, 20, 20) == 0.0


@pytest.mark.parametrize(
    ("area", "negatives", "positives"), [(1.2, 5, 5), (0.5, 0, 5), (0.5, 5, 0)]
)
def test_standard_error_refuses_bad_input(area, negatives, positives):
    with pytest.raises(ValueError):
        auroc_standard_error(area, negatives, positives)
