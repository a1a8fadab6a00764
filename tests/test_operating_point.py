"""engine.operating_point: what a threshold does on scored test images."""

from __future__ import annotations

import numpy as np

from engine.operating_point import operating_point_lines


def test_false_alarms_recall_per_defect_and_confusion() -> None:
    scores = np.array([0.1, 0.9, 2.0, 3.0, 0.5, 4.0])
    defects = ["good", "good", "missing", "missing", "scratch", "scratch"]
    lines = operating_point_lines(scores, defects, threshold=0.8, target_far=0.05)
    assert lines[0].startswith("threshold 0.8: rejects at most 5% of validation good images")
    assert "test good: 1/2 rejected (false-alarm rate 50.0%)" in lines[1]
    assert "caught per defect type: missing 2/2, scratch 1/2" in lines[2]
    assert "3 anomalies caught, 1 missed, 1 false alarms, 1 good passed (recall 75.0%)" in lines[3]


def test_only_good_images() -> None:
    lines = operating_point_lines(np.array([1.0, 2.0]), ["good", "good"], 1.5, 0.05)
    assert len(lines) == 2 and "1/2 rejected" in lines[1]
