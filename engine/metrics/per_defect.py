"""Image AUROC per defect type: which kinds of anomaly a map catches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.data.types import GOOD, GroundTruthChannel, Sample
from engine.metrics.auroc import auroc

__all__ = ["defect_name", "image_auroc_per_defect", "test_defect"]


def defect_name(channels: Sequence[GroundTruthChannel]) -> str:
    """``good`` without channels, else the channels' distinct defect names, sorted, ``+``-joined
    (a channel without a ``defects_config.json`` entry counts as ``unnamed``)."""
    if not channels:
        return GOOD
    return "+".join(sorted({c.defect.name if c.defect else "unnamed" for c in channels}))


def test_defect(sample: Sample, channels: Sequence[GroundTruthChannel]) -> str:
    """The defect name a test image is reported under: ``good`` for a good image, the names of
    its LOCO channels (:func:`defect_name`), else its defect folder (MVTec AD type, ``bad``)."""
    if not sample.label:
        return GOOD
    if any(channel.defect is not None for channel in channels):
        return defect_name(channels)
    return sample.defect_type


def image_auroc_per_defect(scores: np.ndarray, defects: Sequence[str]) -> dict[str, float]:
    """Tie-correct image AUROC of good images vs the images of each defect name.

    ``scores`` (N,) and ``defects`` (N,) as in :class:`Evaluation`; empty without good images.
    """
    names = np.asarray(defects)
    good = scores[names == GOOD]
    if good.size == 0:
        return {}
    return {name: auroc(good, scores[names == name]) for name in sorted(set(defects) - {GOOD})}
