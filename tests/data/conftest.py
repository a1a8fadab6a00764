"""Tiny dataset trees written with Pillow into tmp_path: one LOCO category, one MVTec AD category.

LOCO ``widgets`` (images 32 wide x 24 high)::

    train/good 000-002, validation/good 000-001, test/good 000-001
    test/logical_anomalies 000 (1 channel, px 255), 001 (2 channels: px 255 and px 254)
    test/structural_anomalies 000 (1 channel, px 254)
    defects_config.json: 255 missing_part (absolute 40 px), 254 scratch (relative 1.0)
    loose readme.txt and contact_sheet.png at the category root (allowed)

MVTec AD ``bottle`` (same size): train/good 000-009, test/good 000-001, test/broken 000-001,
test/crack 000, with ``ground_truth/<defect>/NNN_mask.png`` at 0/255.

Folder ``bracket`` (same size): good/ g00-g09, and on request bad/ b0-b3 with masks/ (``b0.png``
and ``b2.png`` named like their image, ``b1_mask.png`` and ``b3_mask.png`` with the suffix).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

HEIGHT, WIDTH = 24, 32
LOCO_CATEGORY = "widgets"
MVTEC_CATEGORY = "bottle"

DEFECTS_CONFIG = [
    {
        "defect_name": "missing_part",
        "pixel_value": 255,
        "saturation_threshold": 40,
        "relative_saturation": False,
    },
    {
        "defect_name": "scratch",
        "pixel_value": 254,
        "saturation_threshold": 1.0,
        "relative_saturation": True,
    },
]

# (type, stem) -> list of (pixel value, (row0, row1, col0, col1)) rectangles, one per channel
LOCO_GT = {
    ("logical_anomalies", "000"): [(255, (2, 8, 3, 12))],
    ("logical_anomalies", "001"): [(255, (0, 5, 0, 5)), (254, (10, 20, 20, 30))],
    ("structural_anomalies", "000"): [(254, (4, 9, 4, 9))],
}
LOCO_GOOD = {"train": 3, "validation": 2, "test": 2}


def rgb_image(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Deterministic random uint8 (H, W, 3) image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def rect_mask(
    value: int, box: tuple[int, int, int, int], height: int = HEIGHT, width: int = WIDTH
) -> np.ndarray:
    """uint8 (H, W) mask with ``value`` on rows box[0]:box[1], cols box[2]:box[3]."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[box[0] : box[1], box[2] : box[3]] = value
    return mask


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write ``array`` as an image file (format from the suffix), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


@dataclass(frozen=True)
class LocoTree:
    """A written LOCO category plus what was written into it, for tests to compare against."""

    root: Path
    category: str
    height: int = HEIGHT
    width: int = WIDTH
    gt: dict = field(default_factory=lambda: LOCO_GT)
    good_counts: dict = field(default_factory=lambda: LOCO_GOOD)
    config: list = field(default_factory=lambda: DEFECTS_CONFIG)

    @property
    def path(self) -> Path:
        return self.root / self.category

    def write_config(self, entries: object) -> Path:
        path = self.path / "defects_config.json"
        path.write_text(json.dumps(entries), encoding="utf-8")
        return path

    def write_image(self, relative: str, array: np.ndarray, mode: str | None = None) -> Path:
        return save(self.path / relative, array, mode)

    @staticmethod
    def rect_mask(value: int, box: tuple[int, int, int, int]) -> np.ndarray:
        return rect_mask(value, box)


def write_loco(root: Path, category: str = LOCO_CATEGORY) -> LocoTree:
    tree = LocoTree(root, category)
    seed = 0
    for split, count in LOCO_GOOD.items():
        for i in range(count):
            save(tree.path / split / "good" / f"{i:03d}.png", rgb_image(seed))
            seed += 1
    for (defect_type, stem), channels in LOCO_GT.items():
        save(tree.path / "test" / defect_type / f"{stem}.png", rgb_image(seed))
        seed += 1
        for k, (value, box) in enumerate(channels):
            save(
                tree.path / "ground_truth" / defect_type / stem / f"{k:03d}.png",
                rect_mask(value, box),
            )
    tree.write_config(DEFECTS_CONFIG)
    (tree.path / "readme.txt").write_text("tiny test category\n")
    save(tree.path / "contact_sheet.png", rgb_image(99))
    return tree


MVTEC_TEST = {"good": 2, "broken": 2, "crack": 1}
MVTEC_TRAIN = 10


@dataclass(frozen=True)
class MVTecTree:
    root: Path
    category: str
    height: int = HEIGHT
    width: int = WIDTH
    train_count: int = MVTEC_TRAIN
    test_counts: dict = field(default_factory=lambda: MVTEC_TEST)

    @property
    def path(self) -> Path:
        return self.root / self.category

    def write_image(self, relative: str, array: np.ndarray, mode: str | None = None) -> Path:
        return save(self.path / relative, array, mode)


def mvtec_mask_box(index: int) -> tuple[int, int, int, int]:
    return (index, index + 6, 2 * index, 2 * index + 7)


def write_mvtec(root: Path, category: str = MVTEC_CATEGORY) -> MVTecTree:
    tree = MVTecTree(root, category)
    for i in range(MVTEC_TRAIN):
        save(tree.path / "train" / "good" / f"{i:03d}.png", rgb_image(100 + i))
    for defect_type, count in MVTEC_TEST.items():
        for i in range(count):
            save(tree.path / "test" / defect_type / f"{i:03d}.png", rgb_image(200 + i))
            if defect_type != "good":
                mask = rect_mask(255, mvtec_mask_box(i))
                save(tree.path / "ground_truth" / defect_type / f"{i:03d}_mask.png", mask)
    return tree


FOLDER_CATEGORY = "bracket"
FOLDER_GOOD, FOLDER_BAD = 10, 4


@dataclass(frozen=True)
class FolderTree:
    root: Path
    category: str
    good_count: int = FOLDER_GOOD
    bad_count: int = 0

    @property
    def path(self) -> Path:
        return self.root / self.category

    def write_image(self, relative: str, array: np.ndarray, mode: str | None = None) -> Path:
        return save(self.path / relative, array, mode)

    @staticmethod
    def rect_mask(value: int, box: tuple[int, int, int, int]) -> np.ndarray:
        return rect_mask(value, box)

    @staticmethod
    def rgb_image(seed: int) -> np.ndarray:
        return rgb_image(seed)


def folder_mask_name(index: int) -> str:
    """Even bad images get ``b<i>.png`` masks, odd ones ``b<i>_mask.png``: both rules."""
    return f"b{index}.png" if index % 2 == 0 else f"b{index}_mask.png"


def write_folder(
    root: Path, category: str = FOLDER_CATEGORY, bad: bool = False, masks: bool = False
) -> FolderTree:
    """good/ (10 images), optionally bad/ (4) and masks/ (one per bad image)."""
    tree = FolderTree(root, category, bad_count=FOLDER_BAD if bad else 0)
    for i in range(FOLDER_GOOD):
        save(tree.path / "good" / f"g{i:02d}.png", rgb_image(300 + i))
    for i in range(FOLDER_BAD if bad else 0):
        save(tree.path / "bad" / f"b{i}.png", rgb_image(400 + i))
        if masks:
            save(tree.path / "masks" / folder_mask_name(i), rect_mask(255, mvtec_mask_box(i)))
    return tree


@pytest.fixture
def loco_tree(tmp_path: Path) -> LocoTree:
    return write_loco(tmp_path / "loco")


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> MVTecTree:
    return write_mvtec(tmp_path / "mvtec")


@pytest.fixture
def folder_tree(tmp_path: Path) -> FolderTree:
    """A folder category with good/ only."""
    return write_folder(tmp_path / "folder")


@pytest.fixture
def folder_tree_bad(tmp_path: Path) -> FolderTree:
    """A folder category with good/ and bad/, no masks."""
    return write_folder(tmp_path / "folder", bad=True)


@pytest.fixture
def folder_tree_masks(tmp_path: Path) -> FolderTree:
    """A folder category with good/, bad/ and masks/."""
    return write_folder(tmp_path / "folder", bad=True, masks=True)


@pytest.fixture
def writers() -> SimpleNamespace:
    """The tree writers, for tests that lay out several categories: ``writers.loco(root,
    category)``, ``writers.mvtec(root, category)``, ``writers.folder(root, category, bad, masks)``."""
    return SimpleNamespace(loco=write_loco, mvtec=write_mvtec, folder=write_folder)


@pytest.fixture
def image_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``image_file(name, array, mode=None)`` writes an image under tmp_path."""

    def make(name: str, array: np.ndarray, mode: str | None = None) -> Path:
        return save(tmp_path / "files" / name, array, mode)

    return make
