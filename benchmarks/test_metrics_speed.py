"""Speed of the exact MVTec LOCO metric on procedurally generated categories.

The full-size case is one LOCO category as large as pushpins (310 test images at 1700×1000,
float32): 138 good, 91 logical with 1–3 channels, 81 structural with 1–2 channels, mixing
absolute and relative saturation. Maps are made lazily, one at a time, from a few noise bases,
so the timed run also shows that memory stays near one copy of the maps. The small case keeps
``--benchmark-disable`` smoke runs quick.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from engine.data.types import GOOD, LOGICAL, STRUCTURAL, DefectSpec, GroundTruthChannel
from engine.metrics import MAX_FPRS, LocoMetrics, compute_loco_metrics

DEFECTS = (
    DefectSpec("additional_part", 255, 6300, False),
    DefectSpec("missing_separator", 254, 1.0, True),
    DefectSpec("extra_cable", 253, 0.5, True),
)
NUM_NOISE_BASES = 4


@dataclass(frozen=True)
class SyntheticCategory:
    """Test images of one category: the maps are generated on demand by :meth:`maps`."""

    height: int
    width: int
    types: list[str]
    channels: list[tuple[GroundTruthChannel, ...]]
    bumps: list[float]  # score added inside each image's channels
    seed: int

    def maps(self) -> Iterator[np.ndarray]:
        """(H, W) float32 maps in image order: shifted noise plus a bump on the defects."""
        rng = np.random.default_rng(self.seed)
        bases = [
            rng.standard_normal((self.height, self.width), dtype=np.float32)
            for _ in range(NUM_NOISE_BASES)
        ]
        for k, (channels, bump) in enumerate(zip(self.channels, self.bumps)):
            anomaly_map = bases[k % NUM_NOISE_BASES] + np.float32(rng.normal(0.0, 0.3))
            for channel in channels:
                anomaly_map[channel.mask] += np.float32(bump)
            yield anomaly_map


def box_channel(rng: np.random.Generator, height: int, width: int) -> GroundTruthChannel:
    """A random rectangle of 1–6 % of the image (LOCO regions are often that large)."""
    box_h = int(rng.integers(height // 10, height // 4))
    box_w = int(rng.integers(width // 10, width // 4))
    top = int(rng.integers(0, height - box_h))
    left = int(rng.integers(0, width - box_w))
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + box_h, left : left + box_w] = True
    return GroundTruthChannel(mask, DEFECTS[int(rng.integers(len(DEFECTS)))])


def make_category(
    height: int, width: int, num_good: int, num_logical: int, num_structural: int, seed: int = 0
) -> SyntheticCategory:
    rng = np.random.default_rng(seed)
    types = [GOOD] * num_good + [LOGICAL] * num_logical + [STRUCTURAL] * num_structural
    channels = []
    for kind in types:
        most = {GOOD: 0, LOGICAL: 3, STRUCTURAL: 2}[kind]
        count = int(rng.integers(1, most + 1)) if most else 0
        channels.append(tuple(box_channel(rng, height, width) for _ in range(count)))
    bumps = rng.uniform(0.0, 2.0, size=len(types)).tolist()
    return SyntheticCategory(height, width, types, channels, bumps, seed + 1)


def evaluate(category: SyntheticCategory) -> LocoMetrics:
    return compute_loco_metrics(category.maps(), category.types, category.channels)


def check(metrics: LocoMetrics) -> None:
    for key in (LOGICAL, STRUCTURAL, "mean"):
        for limit in MAX_FPRS:
            assert 0.0 <= metrics.auc_spro[key][limit] <= 1.0
        assert 0.5 < metrics.auroc[key] <= 1.0
    assert metrics.thresholds.size > 50


def test_loco_metrics_small(benchmark) -> None:
    category = make_category(170, 100, num_good=14, num_logical=9, num_structural=8)
    check(benchmark.pedantic(evaluate, args=(category,), rounds=1, iterations=1))


@pytest.mark.slow
def test_loco_metrics_full_category(benchmark) -> None:
    """One pushpins-size category end to end (the target is under a minute on 2 cores)."""
    category = make_category(1000, 1700, num_good=138, num_logical=91, num_structural=81)
    check(benchmark.pedantic(evaluate, args=(category,), rounds=1, iterations=1))
