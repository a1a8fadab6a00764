"""The MVTec LOCO AD metric, equal to the official evaluator (reference notes §2.2–2.6).

sPRO of a ground-truth channel at threshold t is ``min(TP_c(t) / saturation_area_c, 1)`` with
``TP_c(t)`` its pixels scoring ``> t``; the curve's y is the plain mean over every channel of the
subset's anomalous images. Its x is one global FPR over the defect-free pixels (good images, and
anomalous images outside the union of their channels). Thresholds are chosen adaptively on all
test images (:mod:`engine.metrics.loco_thresholds`) and reused for the two subsets
``logical_anomalies`` = good ∪ logical and ``structural_anomalies`` = good ∪ structural.

Speed and memory: instead of the official (thresholds × H × W) boolean stacks, each image keeps
its defect-free scores sorted, and each channel its own scores sorted, so a pixel count above
any threshold is one binary search. The sorted arrays together hold about one copy of the maps,
and maps can be fed one at a time (:meth:`LocoEvaluator.add`) so the caller never needs them
all in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from engine.data.types import GOOD, LOGICAL, STRUCTURAL, GroundTruthChannel
from engine.metrics.auroc import auroc, auroc_official, roc_curve
from engine.metrics.curve import trapezoid
from engine.metrics.loco_thresholds import (
    MAX_SAMPLED_SCORES,
    initial_thresholds,
    refine_thresholds,
)
from engine.metrics.per_defect import defect_name

MAX_FPRS = (0.01, 0.05, 0.1, 0.3, 1.0)
ANOMALY_TYPES = (LOGICAL, STRUCTURAL)
MEAN = "mean"


@dataclass(frozen=True)
class SproCurve:
    """The (FPR, mean sPRO) points of one subset at the chosen thresholds."""

    thresholds: np.ndarray  # (T,) strictly descending
    fpr: np.ndarray  # (T,) non-decreasing, 0 to 1
    spro: np.ndarray  # (T,) non-decreasing, 0 to 1


@dataclass(frozen=True)
class RocCurve:
    """Tie-correct image-level ROC (FPR ascending), for plotting."""

    fpr: np.ndarray  # (K,)
    tpr: np.ndarray  # (K,)


@dataclass(frozen=True)
class LocoMetrics:
    """All LOCO results of one category. ``None`` marks a value the data cannot define.

    ``auroc`` is the official value (tie quirk included), ``auroc_tie_correct`` the Mann–Whitney
    one; both are keyed ``logical_anomalies``, ``structural_anomalies``, ``mean``. ``auc_spro``
    maps the same keys to {integration limit: AU-sPRO normalised by the limit}.
    ``auc_spro_per_defect`` maps each subset to {defect name: {limit: AU-sPRO}}: the AU-sPRO
    the subset would have if all its channels were of that defect (the same thresholds and the
    subset's FPR, the mean sPRO over that defect's channels only), so the subset's value is
    the channel-count-weighted mean of its defects'. Names as
    :func:`~engine.metrics.per_defect.defect_name` gives them (``unnamed`` without a config
    entry).
    """

    auroc: dict[str, float | None]
    auroc_tie_correct: dict[str, float | None]
    auc_spro: dict[str, dict[float, float | None]]
    spro_curves: dict[str, SproCurve]  # per subset that has a curve
    roc_curves: dict[str, RocCurve]  # per anomaly type with both classes present
    image_scores: dict[str, np.ndarray]  # per image type: max of each map, in input order
    thresholds: np.ndarray  # (T,) every threshold chosen, descending (empty if no curve)
    max_fprs: tuple[float, ...]
    auc_spro_per_defect: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)

    def to_official_json(self) -> dict:
        """The official ``metrics.json`` content as a JSON-ready dict, plus our tie-correct AUROC.

        Integration limits become ``str(float)`` keys as in the official script; the extra
        ``classification.auc_roc_tie_correct`` sits beside ``auc_roc`` without changing it.
        """
        return {
            "classification": {
                "auc_roc": dict(self.auroc),
                "auc_roc_tie_correct": dict(self.auroc_tie_correct),
            },
            "localization": {
                "auc_spro": {
                    key: {str(float(limit)): value for limit, value in per_limit.items()}
                    for key, per_limit in self.auc_spro.items()
                }
            },
        }


def _round_down_to(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest ``dtype`` values <= ``thresholds`` (float64), so that for any score s of that
    dtype, ``s > t`` in float64 (as the official comparison) equals ``s > key``."""
    if dtype == np.float64:
        return thresholds
    with np.errstate(over="ignore"):
        keys = thresholds.astype(dtype)
    too_big = keys.astype(np.float64) > thresholds
    keys[too_big] = np.nextafter(keys[too_big], dtype.type(-np.inf))
    return keys


def _count_above(sorted_scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Number of scores strictly above each key; ``sorted_scores`` ascending."""
    return sorted_scores.size - np.searchsorted(sorted_scores, keys, side="right")


def _score_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """float32 or float64 to hold a map's values exactly (float16 and small ints fit float32)."""
    if dtype.kind not in "fiu":
        raise ValueError(f"{name}: anomaly map must hold real numbers, got dtype {dtype}")
    return np.result_type(dtype, np.float32)


class LocoEvaluator:
    """Accumulates test images one at a time, then computes :class:`LocoMetrics`.

    Each :meth:`add` reduces a map to sorted score arrays, so the map itself can be dropped.
    """

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None
        self._types: list[str] = []
        self._max_scores: list[float] = []
        self._min_scores: list[float] = []
        self._free: list[np.ndarray] = []  # per image: defect-free scores, ascending
        self._defective: list[np.ndarray] = []  # per image: scores in the channels' union
        self._channels: list[np.ndarray] = []  # per channel: its scores, ascending
        self._saturation: list[int] = []  # per channel
        self._channel_image: list[int] = []  # per channel: index of its image
        self._channel_defect: list[str] = []  # per channel: its defect name

    @property
    def num_images(self) -> int:
        return len(self._types)

    def add(
        self,
        anomaly_map: np.ndarray,
        defect_type: str,
        channels: Sequence[GroundTruthChannel] = (),
        name: str = "",
    ) -> None:
        """Add one test image.

        Args:
            anomaly_map: (H, W) real scores, larger = more anomalous, at the GT's resolution.
            defect_type: ``good``, ``logical_anomalies`` or ``structural_anomalies``.
            channels: the image's ground-truth channels; empty exactly for good images.
            name: how errors refer to this image (e.g. the map's path).
        """
        name = name or f"test image #{self.num_images}"
        if defect_type not in (GOOD, *ANOMALY_TYPES):
            raise ValueError(
                f"{name}: defect type must be one of {(GOOD, *ANOMALY_TYPES)}, got {defect_type!r}"
            )
        scores = np.asarray(anomaly_map)
        if scores.ndim != 2:
            raise ValueError(f"{name}: anomaly map must be 2-D, got shape {scores.shape}")
        scores = scores.astype(_score_dtype(scores.dtype, name), copy=False)
        if self._shape is not None and scores.shape != self._shape:
            raise ValueError(
                f"{name}: anomaly map shape {scores.shape} differs from the first map's "
                f"{self._shape}; all maps of a category must share one shape"
            )
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"{name}: anomaly map contains NaN or Inf")
        if (defect_type == GOOD) != (len(channels) == 0):
            raise ValueError(
                f"{name}: a {defect_type} image needs "
                + ("no ground-truth channel" if defect_type == GOOD else "ground-truth channels")
                + f", got {len(channels)}"
            )
        masks = [self._check_channel(c, k, scores.shape, name) for k, c in enumerate(channels)]

        if masks:
            union = np.logical_or.reduce(masks)
            free = np.sort(scores[~union])
            defective = np.sort(scores[union])
            for channel, mask in zip(channels, masks):
                # A single channel is the union; share its sorted scores instead of a copy.
                self._channels.append(defective if len(masks) == 1 else np.sort(scores[mask]))
                self._saturation.append(channel.saturation_area)
                self._channel_image.append(self.num_images)
                self._channel_defect.append(defect_name((channel,)))
        else:
            free = np.sort(scores, axis=None)
            defective = free[:0]
        self._shape = scores.shape
        self._types.append(defect_type)
        self._max_scores.append(float(scores.max()))
        self._min_scores.append(float(scores.min()))
        self._free.append(free)
        self._defective.append(defective)

    @staticmethod
    def _check_channel(
        channel: GroundTruthChannel, index: int, shape: tuple[int, ...], name: str
    ) -> np.ndarray:
        mask = channel.mask
        if mask.dtype != np.bool_ or mask.shape != shape:
            raise ValueError(
                f"{name}: ground-truth channel {index} must be a bool mask of the map's shape "
                f"{shape}, got {mask.dtype} {mask.shape}"
            )
        if channel.area == 0:
            raise ValueError(f"{name}: ground-truth channel {index} is empty")
        if channel.saturation_area <= 0:
            # The official script divides by it and gets NaN sPROs; refuse instead.
            raise ValueError(
                f"{name}: ground-truth channel {index} has saturation area "
                f"{channel.saturation_area} (area {channel.area}, defect {channel.defect})"
            )
        return mask

    def _sampled_scores(self, seed: int) -> np.ndarray:
        """All scores if there are at most 1e7, else floor(1e7 / n_images) per image.

        The official script samples with the unseeded global ``np.random``, so its full-size
        results vary slightly between runs; we draw from a seeded Generator instead.
        """
        pixels_per_image = int(np.prod(self._shape))
        parts = list(zip(self._free, self._defective))
        if self.num_images * pixels_per_image <= MAX_SAMPLED_SCORES:
            return np.sort(np.concatenate([a for pair in parts for a in pair]))
        per_image = int(np.floor(MAX_SAMPLED_SCORES / self.num_images))
        rng = np.random.default_rng(seed)
        samples = []
        for free, defective in parts:
            # A uniform draw of pixel indices; index i < len(free) picks free[i], the rest
            # pick from the defective scores. Same distribution as drawing from the map.
            picked = rng.choice(pixels_per_image, size=per_image, replace=False)
            in_free = picked < free.size
            samples.append(free[picked[in_free]])
            samples.append(defective[picked[~in_free] - free.size])
        return np.sort(np.concatenate(samples))

    def _fp_counts(self, thresholds: np.ndarray) -> np.ndarray:
        """(n_images, T) defect-free pixels scoring above each threshold."""
        keys = {np.dtype(dt): _round_down_to(thresholds, np.dtype(dt)) for dt in ("f4", "f8")}
        return np.stack([_count_above(free, keys[free.dtype]) for free in self._free])

    def _spros(self, thresholds: np.ndarray) -> np.ndarray:
        """(n_channels, T) sPRO of each channel at each threshold."""
        keys = {np.dtype(dt): _round_down_to(thresholds, np.dtype(dt)) for dt in ("f4", "f8")}
        tp = np.stack([_count_above(scores, keys[scores.dtype]) for scores in self._channels])
        return np.minimum(tp / np.asarray(self._saturation)[:, None], 1.0)

    def _overall_curve(self, thresholds: np.ndarray) -> np.ndarray:
        """(T, 2) mean sPRO and FPR over all test images: the points the refinement sees."""
        free_total = sum(free.size for free in self._free)
        fpr = self._fp_counts(thresholds).sum(axis=0) / free_total
        return np.stack([self._spros(thresholds).mean(axis=0), fpr], axis=1)

    def compute(
        self,
        *,
        max_fprs: Sequence[float] = MAX_FPRS,
        curve_max_distance: float = 0.001,
        seed: int = 0,
        progress: bool = False,
    ) -> LocoMetrics:
        """Choose thresholds on all images, then evaluate both subsets.

        Args:
            max_fprs: integration limits in (0, 1].
            curve_max_distance: the official refinement resolution.
            seed: seed of the score sampling (used only above 1e7 scores in all).
            progress: show progress bars.
        """
        max_fprs = tuple(float(limit) for limit in max_fprs)
        if not max_fprs or not all(0 < limit <= 1 for limit in max_fprs):
            raise ValueError(f"integration limits must lie in (0, 1], got {max_fprs}")
        if not self._channels:
            raise ValueError("LOCO metrics need at least one anomalous image with ground truth")

        types = np.asarray(self._types)
        image_scores = {
            kind: np.asarray(self._max_scores)[types == kind] for kind in (GOOD, *ANOMALY_TYPES)
        }
        auroc_values = {}
        auroc_correct = {}
        roc_curves = {}
        for kind in ANOMALY_TYPES:
            good, bad = image_scores[GOOD], image_scores[kind]
            if good.size and bad.size:
                auroc_values[kind] = auroc_official(good, bad)
                auroc_correct[kind] = auroc(good, bad)
                roc_curves[kind] = RocCurve(*roc_curve(good, bad))
            else:
                auroc_values[kind] = auroc_correct[kind] = None

        if sum(free.size for free in self._free) == 0:
            thresholds = np.empty(0)
            spro_curves = {}
        else:
            thresholds = initial_thresholds(
                self._sampled_scores(seed), min(self._min_scores), max(self._max_scores)
            )
            thresholds, _ = refine_thresholds(
                thresholds, self._overall_curve, curve_max_distance, progress
            )
            spros = self._spros(thresholds)
            channel_types = types[np.asarray(self._channel_image)]
            spro_curves = self._subset_curves(thresholds, types, channel_types, spros)
        per_defect = {
            kind: {
                name: {limit: trapezoid(curve.fpr, spro, limit) / limit for limit in max_fprs}
                for name, spro in self._defect_spros(spros, channel_types == kind).items()
            }
            for kind, curve in spro_curves.items()
        }
        auc_spro = {
            kind: {
                limit: (
                    trapezoid(spro_curves[kind].fpr, spro_curves[kind].spro, limit) / limit
                    if kind in spro_curves
                    else None
                )
                for limit in max_fprs
            }
            for kind in ANOMALY_TYPES
        }
        auc_spro[MEAN] = {
            limit: _mean(auc_spro[LOGICAL][limit], auc_spro[STRUCTURAL][limit])
            for limit in max_fprs
        }
        auroc_values[MEAN] = _mean(auroc_values[LOGICAL], auroc_values[STRUCTURAL])
        auroc_correct[MEAN] = _mean(auroc_correct[LOGICAL], auroc_correct[STRUCTURAL])
        return LocoMetrics(
            auroc=auroc_values,
            auroc_tie_correct=auroc_correct,
            auc_spro=auc_spro,
            spro_curves=spro_curves,
            roc_curves=roc_curves,
            image_scores=image_scores,
            thresholds=thresholds,
            max_fprs=max_fprs,
            auc_spro_per_defect=per_defect,
        )

    def _subset_curves(
        self,
        thresholds: np.ndarray,
        types: np.ndarray,
        channel_types: np.ndarray,
        spros: np.ndarray,
    ) -> dict[str, SproCurve]:
        """Curves of the subsets that have a channel and a defect-free pixel; ``types`` per
        image, ``channel_types`` per channel, ``spros``: :meth:`_spros` at ``thresholds``."""
        fp = self._fp_counts(thresholds)
        free_sizes = np.array([free.size for free in self._free])
        curves = {}
        for kind in ANOMALY_TYPES:
            images = (types == GOOD) | (types == kind)
            free_total = int(free_sizes[images].sum())
            in_subset = channel_types == kind
            if free_total == 0 or not in_subset.any():
                continue
            fpr = fp[images].sum(axis=0) / free_total
            curves[kind] = SproCurve(thresholds, fpr, spros[in_subset].mean(axis=0))
        return curves

    def _defect_spros(self, spros: np.ndarray, in_subset: np.ndarray) -> dict[str, np.ndarray]:
        """Per defect name among the channels ``in_subset`` (a per-channel mask): the (T,) mean
        of its channels' rows of ``spros`` (:meth:`_spros`)."""
        names = np.asarray(self._channel_defect)
        return {
            name: spros[in_subset & (names == name)].mean(axis=0)
            for name in sorted(set(names[in_subset]))
        }


def _mean(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 0.5 * (a + b)


def compute_loco_metrics(
    maps: Iterable[np.ndarray],
    defect_types: Iterable[str],
    ground_truths: Iterable[Sequence[GroundTruthChannel]],
    *,
    max_fprs: Sequence[float] = MAX_FPRS,
    curve_max_distance: float = 0.001,
    seed: int = 0,
    progress: bool = False,
) -> LocoMetrics:
    """LOCO metrics of one category from parallel iterables (maps may be a lazy generator).

    Args:
        maps: (H, W) anomaly map per test image.
        defect_types: ``good`` / ``logical_anomalies`` / ``structural_anomalies`` per image.
        ground_truths: the image's channels (empty for good images).
        max_fprs, curve_max_distance, seed, progress: see :meth:`LocoEvaluator.compute`.
    """
    evaluator = LocoEvaluator()
    items = zip(maps, defect_types, ground_truths, strict=True)
    for anomaly_map, defect_type, channels in tqdm(
        items, desc="indexing maps", unit="map", disable=not progress
    ):
        evaluator.add(anomaly_map, defect_type, channels)
    return evaluator.compute(
        max_fprs=max_fprs, curve_max_distance=curve_max_distance, seed=seed, progress=progress
    )
