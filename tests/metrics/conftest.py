"""The full-pipeline test case of reference notes §2.8(b), shared by the metric tests."""

from dataclasses import dataclass

import numpy as np
import pytest

from engine.data.types import GOOD, LOGICAL, STRUCTURAL, DefectSpec, GroundTruthChannel

SIZE = 20
SPECS = {
    255: DefectSpec("absolute_30", 255, 30, False),
    254: DefectSpec("relative_1", 254, 1.0, True),
    253: DefectSpec("relative_half", 253, 0.5, True),
}


@dataclass
class LocoCase:
    maps: list[np.ndarray]
    types: list[str]
    channels: list[tuple[GroundTruthChannel, ...]]


def base_map(k: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return ((7 * i + 13 * j + 31 * k) % 97) / 97


def block_channel(pixel_value: int, rows: tuple[int, int], cols: tuple[int, int]):
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return GroundTruthChannel(mask, SPECS[pixel_value])


def reference_case() -> LocoCase:
    """Maps (float64) and ground truth exactly as described in §2.8(b)."""
    case = LocoCase([], [], [])

    def add(k, kind, bump=None, channels=()):
        anomaly_map = base_map(k)
        if bump is not None:
            (r0, r1), (c0, c1), amount = bump
            anomaly_map[r0 : r1 + 1, c0 : c1 + 1] += amount
        case.maps.append(anomaly_map)
        case.types.append(kind)
        case.channels.append(tuple(channels))

    for k in range(3):
        add(k, GOOD)
    add(3, LOGICAL, ((2, 11), (2, 11), 0.5), [block_channel(255, (2, 11), (2, 11))])
    add(
        4,
        LOGICAL,
        ((5, 8), (5, 14), 0.3),
        [block_channel(253, (5, 8), (0, 19)), block_channel(255, (14, 17), (14, 17))],
    )
    add(5, STRUCTURAL, ((0, 2), (0, 2), 0.8), [block_channel(254, (0, 3), (0, 3))])
    add(6, STRUCTURAL, ((10, 19), (10, 19), 0.2), [block_channel(254, (10, 19), (10, 19))])
    return case


# Official AU-sPRO of §2.8(b) at limits 0.01, 0.05, 0.1, 0.3, 1.0.
REFERENCE_AU_SPRO = {
    LOGICAL: [0.433828, 0.454028, 0.473222, 0.574391, 0.796748],
    STRUCTURAL: [0.335223, 0.348038, 0.373447, 0.459250, 0.682918],
    "mean": [0.384525, 0.401033, 0.423334, 0.516821, 0.739833],
}


@pytest.fixture
def loco_case() -> LocoCase:
    return reference_case()


@pytest.fixture
def reference_au_spro() -> dict[str, list[float]]:
    return REFERENCE_AU_SPRO
