"""engine.data.formats: --data-format, what ``auto`` detects, and what each layout can evaluate."""

from __future__ import annotations

import logging
import re
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from engine.data import FolderDataset, LocoDataset, MVTecADDataset, open_dataset
from engine.data.formats import (
    evaluation_level,
    evaluation_plan,
    format_of,
    list_categories,
    resolve_format,
)
from engine.data.types import DatasetError


def _raises_naming(path: Path, match: str = "") -> AbstractContextManager:
    """Expect a DatasetError whose message starts with ``path`` and then matches ``match``."""
    return pytest.raises(DatasetError, match=f"^{re.escape(str(path))}.*{match}")


@pytest.fixture
def mixed_root(tmp_path: Path, writers) -> Path:
    """One category of each layout under one root, and a folder of nothing known."""
    writers.loco(tmp_path, "widgets")
    writers.mvtec(tmp_path, "bottle")
    writers.folder(tmp_path, "bracket", bad=True)
    (tmp_path / "scans" / "images").mkdir(parents=True)
    (tmp_path / ".bracket.partial").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("category", "name", "reader"),
    [
        ("widgets", "loco", LocoDataset),
        ("bottle", "mvtec", MVTecADDataset),
        ("bracket", "folder", FolderDataset),
    ],
)
def test_auto_detects_each_layout_and_says_which(
    mixed_root: Path, caplog, category: str, name: str, reader: type
) -> None:
    with caplog.at_level(logging.INFO, logger="engine.data.formats"):
        dataset = open_dataset(mixed_root, category)
    assert isinstance(dataset, reader) and format_of(dataset) == name
    assert resolve_format(mixed_root, category, "auto") == name
    message = caplog.records[0].getMessage()
    assert str(mixed_root / category) in message and "detected" in message


def test_explicit_format_is_used_and_logged(mixed_root: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="engine.data.formats"):
        assert isinstance(open_dataset(mixed_root, "bottle", "mvtec"), MVTecADDataset)
    assert "MVTec AD layout (--data-format)" in caplog.text


def test_no_known_layout_names_the_folder_and_what_it_holds(mixed_root: Path) -> None:
    with _raises_naming(mixed_root / "scans", r"no known data layout \(it holds \['images'\]\)"):
        open_dataset(mixed_root, "scans")
    with pytest.raises(DatasetError, match=r"good/.*defects_config\.json.*--data-format"):
        open_dataset(mixed_root, "scans")


def test_missing_category_lists_the_folders(mixed_root: Path) -> None:
    with _raises_naming(mixed_root / "cable", "category folder not found.*bottle"):
        open_dataset(mixed_root, "cable", "folder")


def test_a_format_that_does_not_match_fails_naming_the_missing_folder(mixed_root: Path) -> None:
    with _raises_naming(mixed_root / "bracket" / "train" / "good", "missing folder"):
        open_dataset(mixed_root, "bracket", "loco")
    with _raises_naming(mixed_root / "widgets" / "good", "missing folder"):
        open_dataset(mixed_root, "widgets", "folder")


def test_malformed_loco_is_not_read_as_mvtec(loco_tree) -> None:
    shutil.rmtree(loco_tree.path / "validation")
    with _raises_naming(loco_tree.path / "validation", "missing folder"):
        open_dataset(loco_tree.root, loco_tree.category)


def test_unknown_format_is_a_value_error(mixed_root: Path) -> None:
    with pytest.raises(ValueError, match="unknown data format 'coco'"):
        open_dataset(mixed_root, "bottle", "coco")


def test_list_categories_per_format(mixed_root: Path) -> None:
    assert list_categories(mixed_root) == ["bottle", "bracket", "widgets"]
    assert list_categories(mixed_root, "folder") == ["bracket"]
    assert list_categories(mixed_root, "mvtec") == ["bottle"]
    with _raises_naming(mixed_root / "nope", "not found"):
        list_categories(mixed_root / "nope")


@pytest.mark.parametrize(
    ("bad", "masks", "level", "hint"),
    [
        (False, False, "none", "add images of bad parts"),
        (True, False, "image", "add their masks"),
        (True, True, "pixel", "AU-PRO@0.3"),
    ],
)
def test_folder_evaluation_level_and_plan(
    tmp_path: Path, writers, bad: bool, masks: bool, level: str, hint: str
) -> None:
    tree = writers.folder(tmp_path, bad=bad, masks=masks)
    dataset = open_dataset(tree.root, tree.category)
    assert evaluation_level(dataset) == level
    plan = evaluation_plan(dataset)
    assert hint in plan
    assert plan.startswith(f"test: {2 if bad else 0} good, {tree.bad_count} anomalous images")


def test_mvtec_and_loco_evaluation_levels(mvtec_tree, loco_tree) -> None:
    assert evaluation_level(open_dataset(mvtec_tree.root, mvtec_tree.category)) == "pixel"
    assert evaluation_level(open_dataset(loco_tree.root, loco_tree.category)) == "loco"
    # A LOCO category whose anomaly folders are empty builds, without test metrics.
    for kind in ("logical_anomalies", "structural_anomalies"):
        for folder in (loco_tree.path / "test" / kind, loco_tree.path / "ground_truth" / kind):
            shutil.rmtree(folder)
            folder.mkdir()
    dataset = open_dataset(loco_tree.root, loco_tree.category)
    assert evaluation_level(dataset) == "none"
    assert "no test metrics" in evaluation_plan(dataset)
