import numpy as np
import pytest

from engine.metrics.auroc import auroc, auroc_official, roc_curve, roc_points_official
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
