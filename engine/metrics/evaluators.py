"""One test-split evaluator per evaluation level (:mod:`engine.data.formats`), fed one map at a
time, and the JSON and table cells of what each computes.

- ``loco``: the exact MVTec LOCO metric (:class:`LocoMetrics`);
- ``pixel``: image AUROC, pixel AUROC and the exact AU-PRO@0.3 (:class:`MVTecMetrics`);
- ``image``: image AUROC only (:class:`ImageMetrics`): anomalous images without masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.data.types import GroundTruthChannel, Sample
from engine.metrics.auroc import auroc, auroc_official
from engine.metrics.loco import LocoEvaluator, LocoMetrics
from engine.metrics.mvtec import PRO_INTEGRATION_LIMIT, MVTecMetrics, compute_mvtec_metrics


@dataclass(frozen=True)
class ImageMetrics:
    """Image-level results; ``None`` without good or without anomalous images."""

    image_auroc: float | None  # tie-correct
    image_auroc_official: float | None  # official ROC tie quirk


TestMetrics = LocoMetrics | MVTecMetrics | ImageMetrics


class Evaluator(Protocol):
    """Accumulates test images (``add``), then computes one level's metrics."""

    @property
    def num_images(self) -> int: ...

    def add(
        self,
        anomaly_map: np.ndarray,
        sample: Sample,
        channels: Sequence[GroundTruthChannel],
        name: str = "",
    ) -> None: ...

    def compute(
        self, *, curve_max_distance: float = 0.001, seed: int = 0, progress: bool = False
    ) -> TestMetrics: ...


class LocoLevel:
    """:class:`LocoEvaluator` behind the common interface."""

    def __init__(self) -> None:
        self._evaluator = LocoEvaluator()

    @property
    def num_images(self) -> int:
        return self._evaluator.num_images

    def add(
        self,
        anomaly_map: np.ndarray,
        sample: Sample,
        channels: Sequence[GroundTruthChannel],
        name: str = "",
    ) -> None:
        self._evaluator.add(anomaly_map, sample.defect_type, channels, name)

    def compute(
        self, *, curve_max_distance: float = 0.001, seed: int = 0, progress: bool = False
    ) -> LocoMetrics:
        return self._evaluator.compute(
            curve_max_distance=curve_max_distance, seed=seed, progress=progress
        )


class _Checked:
    """Shared checks of one test map: 2-D, real, finite; label from the sample."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.labels: list[bool] = []

    @property
    def num_images(self) -> int:
        return len(self.scores)

    def _check(self, anomaly_map: np.ndarray, sample: Sample, name: str) -> np.ndarray:
        name = name or str(sample.image_path)
        scores = np.asarray(anomaly_map)
        if scores.ndim != 2 or scores.dtype.kind not in "fiu":
            raise ValueError(
                f"{name}: anomaly map must be 2-D real, got {scores.dtype} {scores.shape}"
            )
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"{name}: anomaly map contains NaN or Inf")
        self.scores.append(float(scores.max()))
        self.labels.append(bool(sample.label))
        return scores


class ImageLevel(_Checked):
    """Image AUROC from the maps' maxima; masks are neither needed nor read."""

    def add(
        self,
        anomaly_map: np.ndarray,
        sample: Sample,
        channels: Sequence[GroundTruthChannel] = (),
        name: str = "",
    ) -> None:
        self._check(anomaly_map, sample, name)

    def compute(
        self, *, curve_max_distance: float = 0.001, seed: int = 0, progress: bool = False
    ) -> ImageMetrics:
        scores, labels = np.asarray(self.scores), np.asarray(self.labels, dtype=bool)
        if not (labels.any() and (~labels).any()):
            return ImageMetrics(None, None)
        good, bad = scores[~labels], scores[labels]
        return ImageMetrics(auroc(good, bad), auroc_official(good, bad))


class PixelLevel(_Checked):
    """MVTec AD metrics; keeps each map (float32) and its mask until :meth:`compute`."""

    def __init__(self) -> None:
        super().__init__()
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray | None] = []

    def add(
        self,
        anomaly_map: np.ndarray,
        sample: Sample,
        channels: Sequence[GroundTruthChannel],
        name: str = "",
    ) -> None:
        scores = self._check(anomaly_map, sample, name)
        if bool(sample.label) != bool(channels):
            raise ValueError(
                f"{name or sample.image_path}: an anomalous image needs a mask and a good one none"
            )
        self._maps.append(scores.astype(np.float32))
        self._masks.append(np.logical_or.reduce([c.mask for c in channels]) if channels else None)

    def compute(
        self, *, curve_max_distance: float = 0.001, seed: int = 0, progress: bool = False
    ) -> MVTecMetrics:
        return compute_mvtec_metrics(self._maps, self._masks, progress=progress)


EVALUATORS: dict[str, type[Evaluator]] = {
    "loco": LocoLevel,
    "pixel": PixelLevel,
    "image": ImageLevel,
}


def make_evaluator(level: str) -> Evaluator:
    """A fresh evaluator for ``level`` (``loco``, ``pixel`` or ``image``)."""
    if level not in EVALUATORS:
        raise ValueError(f"no metrics for evaluation level {level!r}; expected {tuple(EVALUATORS)}")
    return EVALUATORS[level]()


AU_PRO_KEY = f"au_pro_{PRO_INTEGRATION_LIMIT:g}"


def metrics_json(metrics: MVTecMetrics | ImageMetrics) -> dict[str, float | None]:
    """The values of a ``pixel`` or ``image`` evaluation as a JSON-ready dict (``None``: the data
    cannot define the value)."""
    values = {
        "image_auroc": metrics.image_auroc,
        "image_auroc_official": metrics.image_auroc_official,
    }
    if isinstance(metrics, MVTecMetrics):
        values["pixel_auroc"] = metrics.pixel_auroc
        values[AU_PRO_KEY] = metrics.au_pro
    return values


def metric_cells(metrics: MVTecMetrics | ImageMetrics) -> dict[str, float | None]:
    """Table columns of a ``pixel`` or ``image`` evaluation: header -> value."""
    cells = {"image AUROC": metrics.image_auroc}
    if isinstance(metrics, MVTecMetrics):
        cells["pixel AUROC"] = metrics.pixel_auroc
        cells[f"AU-PRO@{metrics.integration_limit:g}"] = metrics.au_pro
    return cells


__all__ = [
    "AU_PRO_KEY",
    "Evaluator",
    "ImageMetrics",
    "TestMetrics",
    "make_evaluator",
    "metric_cells",
    "metrics_json",
]
