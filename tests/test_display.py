"""engine.overlay and Result.mask on hand-made results: tint only where the map is high, the
mask outlined, the banner scaled to the frame."""

from __future__ import annotations

import numpy as np
import pytest

from engine.display import overlay
from engine.runtime import Result


def result(anomaly_map: np.ndarray, threshold: float = 5.0) -> Result:
    score = float(anomaly_map.max())
    return Result(
        score=score,
        is_anomalous=score > threshold,
        anomaly_map=anomaly_map,
        logical_map=np.zeros((4, 4), np.float32),
        structural_map=np.zeros((4, 4), np.float32),
        latency_ms=3.0,
        threshold=threshold,
    )


def frame(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 90, dtype=np.uint8)


def test_mask_is_the_pixels_above_the_threshold() -> None:
    amap = np.zeros((20, 30), np.float32)
    amap[5:9, 10:14] = 8.0
    r = result(amap)
    assert r.mask.sum() == 16 and r.mask[6, 11] and r.is_anomalous
    assert not result(np.ones((20, 30), np.float32)).mask.any()


def test_normal_areas_keep_their_colours_and_the_region_is_outlined() -> None:
    amap = np.zeros((600, 800), np.float32)
    amap[200:400, 300:500] = 9.0
    drawn = overlay(frame(600, 800), result(amap), color="rgb")
    assert np.array_equal(drawn[550:, :], frame(600, 800)[550:, :])  # below banner, normal map
    assert (drawn[200, 300:500] == 255).all()  # the outline on the region's top edge
    inside = drawn[300, 400].astype(int)
    assert abs(inside - 90).max() >= 30  # tinted


@pytest.mark.parametrize("height", [240, 2048])
def test_banner_grows_with_the_frame(height: int) -> None:
    width = height * 4 // 3
    amap = np.zeros((height, width), np.float32)
    drawn = overlay(frame(height, width), result(amap), color="rgb")
    banner_rows = np.flatnonzero((drawn[:, 0] != 90).any(axis=1))
    assert banner_rows.max() >= height // 20  # the text is a twentieth of the height
    assert banner_rows.max() < height // 5
