"""Typed records shared by the dataset readers, the synthetic generator, the metrics and the build.

A LOCO ground-truth *channel* is one PNG in ``ground_truth/<type>/<NNN>/``: one annotated defect
region (possibly several blobs), with one ``pixel_value`` that selects its entry in
``defects_config.json``. MVTec AD has one binary mask per image and no config; its channels carry
``defect=None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")
GOOD = "good"
LOGICAL = "logical_anomalies"
STRUCTURAL = "structural_anomalies"
LOCO_ANOMALY_TYPES = (LOGICAL, STRUCTURAL)
# Calibration fits each branch's mean and std over the validation maps and the threshold over
# their scores: one image gives a constant composition map (std 0) and a threshold of one sample.
MIN_VALIDATION_IMAGES = 2


class DatasetError(ValueError):
    """A dataset folder or file is missing or malformed. The message names the offending path."""


@dataclass(frozen=True)
class DefectSpec:
    """One entry of a LOCO ``defects_config.json``.

    ``saturation_threshold`` is an ``int`` pixel count when ``relative_saturation`` is false and a
    ``float`` fraction in (0, 1] of the channel's area when it is true (the official parser
    enforces exactly these types).
    """

    name: str
    pixel_value: int
    saturation_threshold: int | float
    relative_saturation: bool

    def saturation_area(self, defect_area: int) -> int:
        """Pixels of a channel of ``defect_area`` pixels that must be covered for sPRO = 1."""
        if self.relative_saturation:
            return int(self.saturation_threshold * defect_area)
        return min(int(self.saturation_threshold), int(defect_area))


@dataclass(frozen=True)
class GroundTruthChannel:
    """One annotated defect region: a boolean mask at the image's original resolution."""

    mask: np.ndarray  # bool, (H, W)
    defect: DefectSpec | None = None  # None for MVTec AD (no saturation config)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def saturation_area(self) -> int:
        """sPRO saturation area; plain per-region overlap (the whole area) without a config."""
        if self.defect is None:
            return self.area
        return self.defect.saturation_area(self.area)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split.

    ``defect_type`` is the parent folder name: ``good``, ``logical_anomalies`` or
    ``structural_anomalies`` for LOCO, the defect folder name for MVTec AD. ``mask_paths`` lists the
    ground-truth PNGs (one per channel for LOCO; at most one for MVTec AD), empty for good images.
    """

    category: str
    split: str
    defect_type: str
    image_path: Path
    mask_paths: tuple[Path, ...] = field(default=())

    @property
    def label(self) -> int:
        """0 for defect-free, 1 for anomalous."""
        return 0 if self.defect_type == GOOD else 1

    @property
    def stem(self) -> str:
        return self.image_path.stem
