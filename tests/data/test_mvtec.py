"""engine.data.mvtec (MVTec AD layout, validation hold-out)."""

from __future__ import annotations

import re
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

from engine.data import MVTecADDataset
from engine.data.images import read_rgb
from engine.data.mvtec import holdout_indices
from engine.data.types import DatasetError


def _raises_naming(path: Path, match: str = "") -> AbstractContextManager:
    """Expect a DatasetError whose message starts with ``path`` and then matches ``match``."""
    return pytest.raises(DatasetError, match=f"^{re.escape(str(path))}.*{match}")


def test_splits_and_holdout(mvtec_tree) -> None:
    dataset = MVTecADDataset(mvtec_tree.root, mvtec_tree.category, validation_fraction=0.3)
    train = dataset.samples("train")
    validation = dataset.samples("validation")
    assert len(train) + len(validation) == mvtec_tree.train_count
    assert len(validation) == 3
    # evenly spaced over the name-sorted list, disjoint from train
    assert [s.stem for s in validation] == ["001", "005", "008"]
    assert not {s.image_path for s in train} & {s.image_path for s in validation}
    assert all(s.split == "validation" and s.defect_type == "good" for s in validation)
    again = MVTecADDataset(mvtec_tree.root, mvtec_tree.category, validation_fraction=0.3)
    assert again.samples("validation") == validation


def test_default_holdout_is_one_tenth_and_at_least_two(mvtec_tree) -> None:
    dataset = MVTecADDataset(mvtec_tree.root, mvtec_tree.category)
    assert len(dataset.samples("validation")) == 2  # a tenth of 10, raised to the minimum
    assert len(dataset.samples("train")) == mvtec_tree.train_count - 2
    for index in range(mvtec_tree.train_count, 30):
        image = np.random.default_rng(index).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        mvtec_tree.write_image(f"train/good/{index:03d}.png", image)
    assert len(MVTecADDataset(mvtec_tree.root, mvtec_tree.category).samples("validation")) == 3


@pytest.mark.parametrize(("count", "fraction"), [(2, 0.9), (7, 0.01), (100, 0.1), (3, 0.5)])
def test_holdout_indices_bounds(count: int, fraction: float) -> None:
    indices = holdout_indices(count, fraction)
    assert 1 <= len(indices) <= count - 1
    assert len(set(indices)) == len(indices) and all(0 <= i < count for i in indices)
    if count == 100:
        assert indices == list(range(5, 100, 10))


def test_holdout_indices_minimum() -> None:
    assert holdout_indices(10, 0.1, minimum=2) == [2, 7]
    assert holdout_indices(2, 0.1, minimum=2) == [1]  # never all of them


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_validation_fraction(mvtec_tree, fraction: float) -> None:
    with pytest.raises(ValueError, match="validation_fraction"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category, validation_fraction=fraction)


def test_test_samples_and_ground_truth(mvtec_tree) -> None:
    dataset = MVTecADDataset(mvtec_tree.root, mvtec_tree.category)
    test = dataset.samples("test")
    assert [(s.defect_type, s.stem) for s in test] == [
        ("good", "000"),
        ("good", "001"),
        ("broken", "000"),
        ("broken", "001"),
        ("crack", "000"),
    ]
    assert dataset.defects == {}
    assert dataset.ground_truth(test[0]) == []
    for sample in test[2:]:
        (channel,) = dataset.ground_truth(sample)
        i = int(sample.stem)
        expected = np.zeros((mvtec_tree.height, mvtec_tree.width), bool)
        expected[i : i + 6, 2 * i : 2 * i + 7] = True
        np.testing.assert_array_equal(channel.mask, expected)
        assert channel.defect is None and channel.saturation_area == 42
    assert dataset.image_size() == (mvtec_tree.height, mvtec_tree.width)


def test_grayscale_category_reads_as_rgb(mvtec_tree) -> None:
    gray = np.arange(mvtec_tree.height * mvtec_tree.width, dtype=np.uint8).reshape(
        mvtec_tree.height, mvtec_tree.width
    )
    path = mvtec_tree.write_image("train/good/000.png", gray)
    dataset = MVTecADDataset(mvtec_tree.root, mvtec_tree.category)
    assert path in [s.image_path for s in dataset.samples("train")]
    assert read_rgb(path).shape == (mvtec_tree.height, mvtec_tree.width, 3)


def test_missing_train_folder(mvtec_tree) -> None:
    shutil.rmtree(mvtec_tree.path / "train")
    with _raises_naming(mvtec_tree.path / "train/good", "missing folder"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category)


def test_too_few_train_images(mvtec_tree) -> None:
    folder = mvtec_tree.path / "train" / "good"
    for image in sorted(folder.iterdir())[2:]:
        image.unlink()
    with _raises_naming(folder, "at least 3"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category)


def test_anomalous_image_without_mask(mvtec_tree) -> None:
    (mvtec_tree.path / "ground_truth" / "broken" / "001_mask.png").unlink()
    with _raises_naming(mvtec_tree.path / "test/broken/001.png", "without ground truth"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category)


def test_mask_without_image(mvtec_tree) -> None:
    (mvtec_tree.path / "test" / "crack" / "000.png").unlink()
    with _raises_naming(mvtec_tree.path / "ground_truth/crack/000_mask.png", "without its test"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category)


def test_missing_gt_folder_for_defect(mvtec_tree) -> None:
    shutil.rmtree(mvtec_tree.path / "ground_truth" / "crack")
    with _raises_naming(mvtec_tree.path / "ground_truth/crack", "missing"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category)


def test_unknown_gt_folder(mvtec_tree) -> None:
    extra = mvtec_tree.path / "ground_truth" / "scratch"
    extra.mkdir()
    with _raises_naming(extra, "unexpected entry"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category)


def test_badly_named_mask(mvtec_tree) -> None:
    mask = mvtec_tree.path / "ground_truth" / "crack" / "000_mask.png"
    renamed = mask.rename(mask.with_name("000.png"))
    with _raises_naming(renamed, "_mask.png"):
        MVTecADDataset(mvtec_tree.root, mvtec_tree.category)


def test_mask_size_mismatch(mvtec_tree) -> None:
    small = np.zeros((4, 4), np.uint8)
    small[1, 1] = 255
    path = mvtec_tree.write_image("ground_truth/crack/000_mask.png", small)
    dataset = MVTecADDataset(mvtec_tree.root, mvtec_tree.category)
    sample = dataset.samples("test")[-1]
    with _raises_naming(path, "differs from the image size"):
        dataset.ground_truth(sample)
