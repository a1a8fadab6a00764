"""Adaptive threshold selection of the official MVTec LOCO evaluator (reference notes §2.4).

The official script does not sweep every distinct score. It starts from 50 thresholds at
equally spaced ranks of the (possibly sampled) scores and then, for at most 10 rounds, inserts
thresholds where adjacent points of the overall (mean sPRO, FPR) curve lie far apart. The curve
points (and so the AU-sPRO) depend on exactly which thresholds are chosen, so every rule below
follows the official one: candidate test, ordering, the per-round budget and its rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

NUM_INITIAL_THRESHOLDS = 50
MAX_SAMPLED_SCORES = 10_000_000
EPSILON = 1e-6
MIN_QUERIES_PER_ROUND = 20
MAX_CANDIDATES_PER_ROUND = 100
MAX_ROUNDS = 10

CurveValues = Callable[[np.ndarray], np.ndarray]
"""Maps thresholds (T,) to curve points (T, 2): columns mean sPRO and FPR."""


def initial_thresholds(sorted_scores: np.ndarray, min_score: float, max_score: float) -> np.ndarray:
    """The official 50 starting thresholds, descending.

    Args:
        sorted_scores: (S,) ascending, all scores or the official per-image sample of them.
        min_score: the smallest score over all maps (not only the sampled ones).
        max_score: the largest score over all maps.

    Returns:
        (T,) float64, strictly descending, T <= 50: ``max + 1e-6`` (FPR = sPRO = 0), 48 scores at
        equally spaced ranks, ``min - 1e-6`` (FPR = sPRO = 1).
    """
    if sorted_scores.size == 0:
        raise ValueError("initial thresholds need at least one score")
    ranks = np.linspace(0, sorted_scores.size - 1, num=NUM_INITIAL_THRESHOLDS, dtype=int)[1:-1]
    inner = sorted_scores[ranks].astype(np.float64)
    thresholds = np.concatenate([[max_score + EPSILON], inner, [min_score - EPSILON]])
    # Tied scores (e.g. clipped maps) repeat a threshold; the official script then fails an
    # assertion. A repeated threshold adds no curve point, so we keep each value once.
    return np.unique(thresholds)[::-1]


def _new_queries(thresholds: np.ndarray, values: np.ndarray, max_distance: float) -> np.ndarray:
    """Thresholds one official refinement round adds (empty when the curve is fine enough).

    Args:
        thresholds: (T,) strictly descending.
        values: (T, 2) the curve points at ``thresholds``.
        max_distance: ``curve_max_distance``.
    """
    steps = values[:-1] - values[1:]
    distance = np.linalg.norm(steps, axis=1)
    triangle_area = 0.5 * np.prod(steps, axis=1)
    is_candidate = (distance > max_distance) & (triangle_area > 0.25 * max_distance**2)
    candidates = np.flatnonzero(is_candidate)
    if candidates.size == 0:
        return np.empty(0)
    # Largest gaps first; a stable sort keeps curve order among equal distances, as Python's
    # sorted(reverse=True) does in the official script.
    candidates = candidates[np.argsort(-distance[candidates], kind="stable")]
    candidates = candidates[:MAX_CANDIDATES_PER_ROUND]

    # Every candidate gets its midpoint; the rest of the per-round minimum is shared out by
    # distance, with the official running remainders and round-half-to-even.
    num_remaining = max(MIN_QUERIES_PER_ROUND - candidates.size, 0)
    distance_remaining = sum(distance[candidates].tolist())
    queries = []
    for i in candidates:
        additional = int(np.round(distance[i] / distance_remaining * num_remaining))
        between = np.linspace(thresholds[i], thresholds[i + 1], num=3 + additional)[1:-1]
        queries.append(between)
        num_remaining -= additional
        distance_remaining -= distance[i]
    return np.concatenate(queries)


def refine_thresholds(
    thresholds: np.ndarray,
    curve_values: CurveValues,
    max_distance: float = 0.001,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the official refinement: at most 10 rounds of inserting thresholds.

    Args:
        thresholds: (T0,) strictly descending starting thresholds.
        curve_values: computes the overall (mean sPRO, FPR) points for given thresholds.
        max_distance: the official ``curve_max_distance``.
        progress: show a progress bar over the rounds.

    Returns:
        (thresholds (T,), values (T, 2)), thresholds strictly descending.
    """
    if not max_distance > 0:
        raise ValueError(f"curve_max_distance must be > 0, got {max_distance}")
    values = curve_values(thresholds)
    for _ in tqdm(range(MAX_ROUNDS), desc="refining thresholds", disable=not progress):
        queries = _new_queries(thresholds, values, max_distance)
        # Between two adjacent floats a "midpoint" equals an endpoint; the official script
        # would fail an assertion on the repeat. Such a query adds no new point: drop it.
        queries = np.setdiff1d(queries, thresholds)
        if queries.size == 0:
            break
        merged = np.concatenate([thresholds, queries])
        order = np.argsort(merged)[::-1]
        thresholds = merged[order]
        values = np.concatenate([values, curve_values(queries)])[order]
    return thresholds, values
