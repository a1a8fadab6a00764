"""Area under a piecewise-linear curve, cut at an upper x limit, as the official evaluators do.

MVTec's LOCO and AD evaluation scripts integrate their ROC, sPRO and PRO curves with the same
trapezoid routine: non-finite points are dropped, and when the limit falls between two points the
last partial trapezoid uses a y value interpolated linearly between them. Reproducing it operation
by operation keeps our numbers equal to theirs to the last bits.
"""

from __future__ import annotations

import numpy as np


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Trapezoid-rule area under ``y(x)`` from ``x[0]`` up to ``x_max`` (the whole curve if None).

    Args:
        x: (N,) ascending; repeated values are allowed (their order decides the y at the limit).
        y: (N,) the curve's values at ``x``.
        x_max: upper integration limit; must lie within ``[x[0], x[-1]]`` of the finite points.

    Returns:
        The area as a Python float (not normalised by ``x_max``).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if not np.any(x == x_max):
            insert_at = int(np.searchsorted(x, x_max, side="right"))
            if not 0 < insert_at < len(x):
                span = f"[{x[0]}, {x[-1]}]" if x.size else "(no finite point)"
                raise ValueError(f"integration limit {x_max} is outside the curve's x range {span}")
            x0, x1 = x[insert_at - 1], x[insert_at]
            y0, y1 = y[insert_at - 1], y[insert_at]
            y_at_limit = y0 + ((y1 - y0) * (x_max - x0) / (x1 - x0))
            correction = 0.5 * (y_at_limit + y0) * (x_max - x0)
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)
