"""engine.data.folder: a plain folder of good parts, with optional validation/, bad/ and masks/."""

from __future__ import annotations

import re
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

from engine.data.folder import FolderDataset
from engine.data.types import DatasetError


def _raises_naming(path: Path, match: str = "") -> AbstractContextManager:
    """Expect a DatasetError whose message starts with ``path`` and then matches ``match``."""
    return pytest.raises(DatasetError, match=f"^{re.escape(str(path))}.*{match}")


def _stems(dataset: FolderDataset, split: str) -> list[str]:
    return [sample.stem for sample in dataset.samples(split)]


def test_good_only_holds_out_validation_and_has_no_test(folder_tree) -> None:
    dataset = FolderDataset(folder_tree.root, folder_tree.category)
    # 20 % of good/, evenly spaced over the name-sorted list
    assert _stems(dataset, "validation") == ["g02", "g07"]
    assert len(dataset.samples("train")) == folder_tree.good_count - 2
    assert dataset.samples("test") == []
    assert not set(_stems(dataset, "train")) & set(_stems(dataset, "validation"))
    assert dataset.defects == {}


def test_bad_images_bring_a_held_out_good_test_share(folder_tree_bad) -> None:
    dataset = FolderDataset(folder_tree_bad.root, folder_tree_bad.category)
    test = dataset.samples("test")
    assert [(s.defect_type, s.stem) for s in test] == [
        ("good", "g02"),
        ("good", "g07"),
        *[("bad", f"b{i}") for i in range(folder_tree_bad.bad_count)],
    ]
    assert all(s.split == "test" and s.mask_paths == () for s in test)
    assert _stems(dataset, "validation") == ["g03", "g08"]
    splits = [set(_stems(dataset, split)) for split in ("train", "validation")]
    splits.append({s.stem for s in test if not s.label})
    assert set().union(*splits) == {f"g{i:02d}" for i in range(folder_tree_bad.good_count)}
    assert sum(map(len, splits)) == folder_tree_bad.good_count  # disjoint
    again = FolderDataset(folder_tree_bad.root, folder_tree_bad.category)
    assert [again.samples(split) for split in ("train", "validation", "test")] == [
        dataset.samples(split) for split in ("train", "validation", "test")
    ]
    assert dataset.ground_truth(test[-1]) == []


def test_validation_folder_replaces_the_held_out_share(folder_tree_bad) -> None:
    for i in range(3):
        folder_tree_bad.write_image(f"validation/v{i}.png", folder_tree_bad.rgb_image(500 + i))
    dataset = FolderDataset(folder_tree_bad.root, folder_tree_bad.category)
    assert _stems(dataset, "validation") == ["v0", "v1", "v2"]
    assert len(dataset.samples("train")) == folder_tree_bad.good_count - 2  # only the test share


def test_masks_pair_by_name_with_or_without_the_suffix(folder_tree_masks) -> None:
    dataset = FolderDataset(folder_tree_masks.root, folder_tree_masks.category)
    bad = [s for s in dataset.samples("test") if s.label]
    assert [s.mask_paths[0].name for s in bad] == ["b0.png", "b1_mask.png", "b2.png", "b3_mask.png"]
    channels = dataset.ground_truth(bad[1])
    assert len(channels) == 1 and channels[0].defect is None
    expected = folder_tree_masks.rect_mask(255, (1, 7, 2, 9)) > 0
    np.testing.assert_array_equal(channels[0].mask, expected)


def test_missing_or_empty_good_folder(folder_tree) -> None:
    shutil.rmtree(folder_tree.path / "good")
    with _raises_naming(folder_tree.path / "good", "missing folder"):
        FolderDataset(folder_tree.root, folder_tree.category)
    (folder_tree.path / "good").mkdir()
    with _raises_naming(folder_tree.path / "good", "no images"):
        FolderDataset(folder_tree.root, folder_tree.category)


def test_too_few_good_images_for_the_splits(folder_tree) -> None:
    for image in sorted((folder_tree.path / "good").iterdir())[1:]:
        image.unlink()
    with _raises_naming(folder_tree.path / "good", r"at least 3 .*\(1 for training, 2 for valid"):
        FolderDataset(folder_tree.root, folder_tree.category)
    for name in ("h", "i"):
        folder_tree.write_image(f"good/{name}.png", folder_tree.rgb_image(2))
    FolderDataset(folder_tree.root, folder_tree.category)  # 3: 1 training, 2 validation
    folder_tree.write_image("bad/x.png", folder_tree.rgb_image(3))
    with _raises_naming(folder_tree.path / "good", "at least 4 .*1 for testing"):
        FolderDataset(folder_tree.root, folder_tree.category)


def test_mask_without_its_bad_image(folder_tree_masks) -> None:
    stray = folder_tree_masks.write_image(
        "masks/b9_mask.png", folder_tree_masks.rect_mask(255, (0, 2, 0, 2))
    )
    with _raises_naming(stray, "mask without its bad image"):
        FolderDataset(folder_tree_masks.root, folder_tree_masks.category)


def test_bad_image_without_a_mask_when_masks_exist(folder_tree_masks) -> None:
    (folder_tree_masks.path / "masks" / "b2.png").unlink()
    with _raises_naming(folder_tree_masks.path / "bad" / "b2.png", "without a mask"):
        FolderDataset(folder_tree_masks.root, folder_tree_masks.category)


def test_two_masks_for_one_image(folder_tree_masks) -> None:
    second = folder_tree_masks.write_image(
        "masks/b0_mask.png", folder_tree_masks.rect_mask(255, (0, 2, 0, 2))
    )
    with _raises_naming(second, "a second mask"):
        FolderDataset(folder_tree_masks.root, folder_tree_masks.category)


def test_mask_of_another_size_is_refused_naming_it(folder_tree_masks) -> None:
    small = folder_tree_masks.write_image("masks/b0.png", np.full((8, 8), 255, np.uint8))
    dataset = FolderDataset(folder_tree_masks.root, folder_tree_masks.category)
    bad = [s for s in dataset.samples("test") if s.label]
    with _raises_naming(small, "differs from the image size"):
        dataset.ground_truth(bad[0])


def test_sub_folders_and_stray_files_are_refused(folder_tree_bad) -> None:
    (folder_tree_bad.path / "bad" / "scratches").mkdir()
    with _raises_naming(folder_tree_bad.path / "bad" / "scratches", "unexpected folder"):
        FolderDataset(folder_tree_bad.root, folder_tree_bad.category)
    (folder_tree_bad.path / "bad" / "scratches").rmdir()
    notes = folder_tree_bad.path / "good" / "notes.txt"
    notes.write_text("line 3")
    with _raises_naming(notes, "unexpected file"):
        FolderDataset(folder_tree_bad.root, folder_tree_bad.category)


def test_empty_validation_folder_is_refused(folder_tree) -> None:
    (folder_tree.path / "validation").mkdir()
    with _raises_naming(folder_tree.path / "validation", "no images"):
        FolderDataset(folder_tree.root, folder_tree.category)
