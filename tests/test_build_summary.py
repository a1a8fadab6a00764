"""The build's printed summary: the sampling error printed beside a LOCO test set's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.build import noise_line, result_table
from engine.data.types import GOOD, LOGICAL, STRUCTURAL, DefectSpec, GroundTruthChannel
from engine.metrics.auroc import auroc_standard_error
from engine.metrics.loco import compute_loco_metrics
from engine.pipeline import BuildResult


def loco_metrics(peaks: dict[str, list[float]]):
    """LOCO metrics of 4 x 4 maps whose maximum is each image's given peak."""
    maps, types, channels = [], [], []
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    for kind, values in peaks.items():
        for value in values:
            image = np.zeros((4, 4))
            image[0, 0] = value
            maps.append(image)
            types.append(kind)
            channels.append(
                () if kind == GOOD else (GroundTruthChannel(mask, DefectSpec("d", 255, 1.0, True)),)
            )
    return compute_loco_metrics(maps, types, channels)


def test_noise_line_prints_the_subsets_mean_standard_error() -> None:
    metrics = loco_metrics(
        {GOOD: [0.1, 0.2, 0.3, 0.4], LOGICAL: [0.15, 0.35, 0.5], STRUCTURAL: [0.25, 0.6]}
    )
    logical, structural = (metrics.auroc_tie_correct[k] for k in (LOGICAL, STRUCTURAL))
    expected = (auroc_standard_error(logical, 4, 3) + auroc_standard_error(structural, 4, 2)) / 2
    line = noise_line(metrics)
    assert f"±{expected:.3f}" in line
    assert "4 good, 3 logical, 2 structural test images" in line


def test_noise_line_uses_the_subsets_present() -> None:
    metrics = loco_metrics({GOOD: [0.1, 0.2], LOGICAL: [0.15, 0.3]})
    expected = auroc_standard_error(metrics.auroc_tie_correct[LOGICAL], 2, 2)
    assert f"±{expected:.3f}" in noise_line(metrics)


def test_noise_line_is_absent_without_good_test_images() -> None:
    assert noise_line(loco_metrics({LOGICAL: [0.1], STRUCTURAL: [0.2]})) is None


def test_the_summary_prints_the_noise_under_the_artifact_line() -> None:
    metrics = loco_metrics({GOOD: [0.1, 0.2], LOGICAL: [0.15, 0.3], STRUCTURAL: [0.4]})
    result = BuildResult(
        category="pushpins",
        artifact=Path("artifacts/pushpins"),
        metrics={"fused": metrics},
        threshold=0.25,
        image_scores={"fused": np.array([0.1, 0.2, 0.15, 0.3, 0.4])},
        test_defects=["good", "good", "missing", "missing", "broken"],
    )
    lines = result_table([result], 0.05).splitlines()
    at = lines.index("pushpins: artifact artifacts/pushpins")
    assert lines[at + 1] == f"pushpins: {noise_line(metrics)}"
