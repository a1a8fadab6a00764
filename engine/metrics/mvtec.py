"""MVTec AD metrics: image AUROC, pixel AUROC and AU-PRO, exact over every distinct threshold.

PRO follows the official MVTec AD evaluation: ground-truth regions are the 8-connected
components of each binary mask; PRO(t) is the mean over all regions of all images of the
fraction of the region scoring ``>= t``; FPR(t) is the fraction of all defect-free pixels
scoring ``>= t``; the curve is integrated up to FPR 0.3 (trapezoids, interpolated at the
limit) and divided by 0.3.

Between two consecutive distinct scores of *defective* pixels, lowering the threshold only adds
false positives, so the PRO curve is flat there and trapezoids over it are rectangles. Keeping
just the two corner points per distinct defective score, with FPRs from binary searches in the
sorted defect-free scores, therefore gives the same area as the official per-pixel curve while
sorting no more than one copy of the defect-free scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from engine.metrics.auroc import auroc, auroc_official, mann_whitney_auroc
from engine.metrics.curve import trapezoid

PRO_INTEGRATION_LIMIT = 0.3
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


@dataclass(frozen=True)
class ProCurve:
    """(FPR, PRO) points, FPR non-decreasing from (0, 0) to (1, 1)."""

    fpr: np.ndarray  # (K,)
    pro: np.ndarray  # (K,)


@dataclass(frozen=True)
class MVTecMetrics:
    """MVTec AD results of one category; ``None`` where the data cannot define a value."""

    image_auroc: float | None  # tie-correct
    image_auroc_official: float | None  # official ROC tie quirk
    pixel_auroc: float | None  # tie-correct, over all pixels of all images
    au_pro: float | None  # normalised by integration_limit
    integration_limit: float
    pro_curve: ProCurve | None


@dataclass(frozen=True)
class _PixelIndex:
    negatives: np.ndarray  # (N,) defect-free pixel scores, ascending
    positives: np.ndarray  # (P,) defective pixel scores
    weights: np.ndarray  # (P,) 1 / area of each positive pixel's region
    num_regions: int
    image_scores: np.ndarray  # (n_images,) max of each map
    image_labels: np.ndarray  # (n_images,) bool, True if the mask has a defective pixel


def _index_pixels(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], progress: bool
) -> _PixelIndex:
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise ValueError("MVTec AD metrics need at least one image")
    for k, anomaly_map in enumerate(maps):
        dtype = np.asarray(anomaly_map).dtype
        if dtype.kind not in "fiu":
            raise ValueError(f"map {k}: must hold real numbers, got dtype {dtype}")
    dtype = np.result_type(np.float32, *(np.asarray(m).dtype for m in maps))
    # One buffer for all defect-free scores, filled image by image, so they exist once.
    negatives = np.empty(sum(np.asarray(m).size for m in maps), dtype=dtype)
    num_negatives = 0
    positives, weights = [], []
    num_regions = 0
    image_scores = np.empty(len(maps))
    image_labels = np.zeros(len(maps), dtype=bool)
    for k, (anomaly_map, mask) in enumerate(
        tqdm(zip(maps, masks), total=len(maps), desc="indexing maps", disable=not progress)
    ):
        scores = np.asarray(anomaly_map)
        if scores.ndim != 2:
            raise ValueError(f"map {k}: must be 2-D, got shape {scores.shape}")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"map {k}: contains NaN or Inf")
        image_scores[k] = scores.max()
        if mask is None:
            mask = np.zeros(scores.shape, dtype=bool)
        if mask.dtype != np.bool_ or mask.shape != scores.shape:
            raise ValueError(
                f"mask {k}: must be bool of the map's shape {scores.shape}, "
                f"got {mask.dtype} {mask.shape}"
            )
        free = scores[~mask]
        negatives[num_negatives : num_negatives + free.size] = free
        num_negatives += free.size
        if mask.any():
            image_labels[k] = True
            regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            region_of_pixel = regions[mask]
            areas = np.bincount(region_of_pixel)
            positives.append(scores[mask].astype(dtype, copy=False))
            weights.append(1.0 / areas[region_of_pixel])
            num_regions += count
    negatives = negatives[:num_negatives]
    negatives.sort()
    return _PixelIndex(
        negatives=negatives,
        positives=np.concatenate(positives) if positives else np.empty(0, dtype),
        weights=np.concatenate(weights) if weights else np.empty(0),
        num_regions=num_regions,
        image_scores=image_scores,
        image_labels=image_labels,
    )


def _pro_curve(index: _PixelIndex) -> ProCurve:
    order = np.argsort(index.positives)[::-1]
    scores = index.positives[order]
    pro_at_or_above = np.cumsum(index.weights[order]) / index.num_regions
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    values = scores[last_of_tie]  # distinct defective scores, descending
    pro_at_or_above = np.minimum(pro_at_or_above[last_of_tie], 1.0)
    pro_above = np.concatenate([[0.0], pro_at_or_above[:-1]])
    negatives = index.negatives
    fp_above = negatives.size - np.searchsorted(negatives, values, side="right")
    fp_at_or_above = negatives.size - np.searchsorted(negatives, values, side="left")
    # Per distinct value: the corner just above it, then the point at it.
    fpr = np.stack([fp_above, fp_at_or_above], axis=1).reshape(-1) / negatives.size
    pro = np.stack([pro_above, pro_at_or_above], axis=1).reshape(-1)
    return ProCurve(np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]]))


def compute_mvtec_metrics(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    *,
    integration_limit: float = PRO_INTEGRATION_LIMIT,
    progress: bool = False,
) -> MVTecMetrics:
    """Image AUROC, pixel AUROC and AU-PRO of one MVTec AD category.

    Args:
        maps: (H, W) anomaly map per test image (larger = more anomalous).
        masks: (H, W) bool ground truth per image, or None for a defect-free image.
        integration_limit: FPR limit of the PRO integral, in (0, 1].
        progress: show a progress bar while indexing the maps.
    """
    if not 0 < integration_limit <= 1:
        raise ValueError(f"integration_limit must lie in (0, 1], got {integration_limit}")
    index = _index_pixels(maps, masks, progress)
    good = index.image_scores[~index.image_labels]
    bad = index.image_scores[index.image_labels]
    has_both_images = good.size > 0 and bad.size > 0
    has_both_pixels = index.negatives.size > 0 and index.positives.size > 0
    curve = _pro_curve(index) if has_both_pixels else None
    return MVTecMetrics(
        image_auroc=auroc(good, bad) if has_both_images else None,
        image_auroc_official=auroc_official(good, bad) if has_both_images else None,
        pixel_auroc=(
            mann_whitney_auroc(index.negatives, index.positives) if has_both_pixels else None
        ),
        au_pro=(
            trapezoid(curve.fpr, curve.pro, integration_limit) / integration_limit
            if curve is not None
            else None
        ),
        integration_limit=float(integration_limit),
        pro_curve=curve,
    )
