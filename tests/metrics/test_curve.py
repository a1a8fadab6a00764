import numpy as np
import pytest

from engine.metrics.curve import trapezoid

FPR = [0.0, 0.02, 0.1, 1.0]
SPRO = [0.0, 0.5, 0.8, 1.0]


def test_reference_trapezoid_values():
    # Reference notes §2.8(a), produced by the official code.
    assert trapezoid(FPR, SPRO, 0.05) / 0.05 == pytest.approx(0.43375, abs=1e-12)
    assert trapezoid(FPR, SPRO, 1.0) == pytest.approx(0.867, abs=1e-12)


def test_partial_segment_is_interpolated():
    # Up to 0.06: triangle to (0.02, 0.5), then a trapezoid to y(0.06) = 0.5 + 0.3 * 0.5.
    expected = 0.5 * 0.02 * 0.5 + 0.5 * (0.5 + 0.65) * 0.04
    assert trapezoid(FPR, SPRO, 0.06) == pytest.approx(expected, abs=1e-15)


def test_limit_on_a_point_needs_no_interpolation():
    assert trapezoid(FPR, SPRO, 0.1) == pytest.approx(0.5 * 0.02 * 0.5 + 0.5 * 1.3 * 0.08)


def test_repeated_x_takes_last_y_before_the_limit():
    # A vertical step at x = 0.5: the partial segment starts from the upper point.
    assert trapezoid([0.0, 0.5, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0], 0.75) == pytest.approx(0.25)


def test_non_finite_points_are_dropped():
    assert trapezoid([0.0, 0.5, np.nan, 1.0], [0.0, 1.0, 3.0, 1.0]) == pytest.approx(0.75)


def test_limit_outside_the_curve_is_refused():
    with pytest.raises(ValueError, match="outside"):
        trapezoid([0.0, 0.5], [0.0, 1.0], 0.7)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same length"):
        trapezoid([0.0, 1.0], [0.0, 0.5, 1.0])
