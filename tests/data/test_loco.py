"""engine.data.loco: layout checks, defects_config.json rules, samples and ground truth."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

from engine.data.loco import LocoDataset, list_categories, parse_defects_config
from engine.data.types import DatasetError, DefectSpec


def _raises_naming(path: Path, match: str = "") -> AbstractContextManager:
    """Expect a DatasetError whose message starts with ``path`` and then matches ``match``."""
    return pytest.raises(DatasetError, match=f"^{re.escape(str(path))}.*{match}")


def test_valid_tree_samples(loco_tree) -> None:
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    for split in ("train", "validation"):
        samples = dataset.samples(split)
        assert len(samples) == loco_tree.good_counts[split]
        assert all(s.defect_type == "good" and s.label == 0 and s.split == split for s in samples)
        assert [s.stem for s in samples] == [f"{i:03d}" for i in range(len(samples))]

    test = dataset.samples("test")
    expected = [("good", "000"), ("good", "001"), *sorted(loco_tree.gt)]
    assert [(s.defect_type, s.stem) for s in test] == expected
    for sample in test[2:]:
        n_channels = len(loco_tree.gt[(sample.defect_type, sample.stem)])
        assert len(sample.mask_paths) == n_channels and sample.label == 1
        folder = loco_tree.path / "ground_truth" / sample.defect_type / sample.stem
        assert all(p.parent == folder for p in sample.mask_paths)
    assert all(s.category == loco_tree.category for s in test)


def test_defects_are_parsed(loco_tree) -> None:
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    assert dataset.defects == {
        255: DefectSpec("missing_part", 255, 40, False),
        254: DefectSpec("scratch", 254, 1.0, True),
    }
    assert type(dataset.defects[255].saturation_threshold) is int
    assert type(dataset.defects[254].saturation_threshold) is float


def test_ground_truth_channels(loco_tree) -> None:
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    for sample in dataset.samples("test"):
        channels = dataset.ground_truth(sample)
        written = loco_tree.gt.get((sample.defect_type, sample.stem), [])
        assert len(channels) == len(written)
        for channel, (value, (r0, r1, c0, c1)) in zip(channels, written, strict=True):
            expected = np.zeros((loco_tree.height, loco_tree.width), bool)
            expected[r0:r1, c0:c1] = True
            np.testing.assert_array_equal(channel.mask, expected)
            assert channel.defect is not None and channel.defect.pixel_value == value
            assert channel.area == (r1 - r0) * (c1 - c0)


def test_image_size_and_categories(loco_tree) -> None:
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    assert dataset.image_size() == (loco_tree.height, loco_tree.width)
    assert dataset.image_size("train") == (loco_tree.height, loco_tree.width)
    (loco_tree.root / "not_a_category").mkdir()
    (loco_tree.root / "notes.txt").write_text("x")
    shutil.copytree(loco_tree.path, loco_tree.root / ".widgets.partial-1")
    shutil.copytree(loco_tree.path, loco_tree.root / "gizmos")
    assert list_categories(loco_tree.root) == ["gizmos", loco_tree.category]


def test_image_size_mismatch(loco_tree) -> None:
    odd = loco_tree.write_image("test/good/001.png", np.zeros((10, 10, 3), np.uint8))
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    assert dataset.image_size("train") == (loco_tree.height, loco_tree.width)
    with _raises_naming(odd, "differs"):
        dataset.image_size()


def test_bad_split_name(loco_tree) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        LocoDataset(loco_tree.root, loco_tree.category).samples("val")


def test_missing_category_lists_available(loco_tree) -> None:
    with pytest.raises(DatasetError, match=loco_tree.category) as info:
        LocoDataset(loco_tree.root, "gadgets")
    assert str(loco_tree.root / "gadgets") in str(info.value)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../widgets", "a/b", "a\\b", "/abs", ".hidden", " widgets", "a\0b"]
)
def test_category_must_be_a_plain_folder_name(loco_tree, name: str) -> None:
    with pytest.raises(DatasetError, match="not a plain folder name"):
        LocoDataset(loco_tree.root, name)


def test_category_path_reaching_a_real_category_is_refused(loco_tree) -> None:
    sneaky = f"../{loco_tree.root.name}/{loco_tree.category}"
    assert (loco_tree.root / sneaky).is_dir()
    with pytest.raises(DatasetError, match="path separator"):
        LocoDataset(loco_tree.root, sneaky)


def test_missing_root() -> None:
    with pytest.raises(DatasetError, match="not found"):
        list_categories("/nonexistent/loco_root")


@pytest.mark.parametrize(
    "folder",
    [
        "train/good",
        "validation",
        "test/good",
        "test/logical_anomalies",
        "test/structural_anomalies",
        "ground_truth/structural_anomalies",
    ],
)
def test_missing_split_folder(loco_tree, folder: str) -> None:
    shutil.rmtree(loco_tree.path / folder)
    with pytest.raises(DatasetError, match="missing folder") as info:
        LocoDataset(loco_tree.root, loco_tree.category)
    assert str(loco_tree.path / folder) in str(info.value)
    assert "validation/good" in str(info.value)  # says what is expected


def test_missing_config(loco_tree) -> None:
    path = loco_tree.path / "defects_config.json"
    path.unlink()
    with _raises_naming(path, "missing file"):
        LocoDataset(loco_tree.root, loco_tree.category)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_unknown_ground_truth_entry(loco_tree, kind: str) -> None:
    entry = loco_tree.path / "ground_truth" / "other_anomalies"
    entry.mkdir() if kind == "folder" else entry.write_text("x")
    (loco_tree.path / "ground_truth" / ".DS_Store").write_text("ignored")
    with _raises_naming(entry, "unexpected entry"):
        LocoDataset(loco_tree.root, loco_tree.category)


def test_gt_folder_without_test_image(loco_tree) -> None:
    image = loco_tree.path / "test" / "structural_anomalies" / "000.png"
    image.unlink()
    with _raises_naming(loco_tree.path / "ground_truth/structural_anomalies/000", "000.png"):
        LocoDataset(loco_tree.root, loco_tree.category)


def test_anomalous_image_without_gt(loco_tree) -> None:
    shutil.rmtree(loco_tree.path / "ground_truth" / "logical_anomalies" / "001")
    image = loco_tree.path / "test" / "logical_anomalies" / "001.png"
    with _raises_naming(image, "without ground truth"):
        LocoDataset(loco_tree.root, loco_tree.category)


def test_gt_folder_without_png(loco_tree) -> None:
    folder = loco_tree.path / "ground_truth" / "logical_anomalies" / "000"
    for png in folder.iterdir():
        png.unlink()
    with _raises_naming(folder, "no PNG"):
        LocoDataset(loco_tree.root, loco_tree.category)


def test_non_png_in_gt_folder(loco_tree) -> None:
    stray = loco_tree.path / "ground_truth" / "logical_anomalies" / "000" / "notes.txt"
    stray.write_text("x")
    with _raises_naming(stray, "only PNGs"):
        LocoDataset(loco_tree.root, loco_tree.category)


def test_non_image_in_split_folder(loco_tree) -> None:
    stray = loco_tree.path / "train" / "good" / "labels.csv"
    stray.write_text("x")
    with _raises_naming(stray, "unexpected file"):
        LocoDataset(loco_tree.root, loco_tree.category)


def test_empty_train_folder(loco_tree) -> None:
    folder = loco_tree.path / "train" / "good"
    shutil.rmtree(folder)
    folder.mkdir()
    with _raises_naming(folder, "no images"):
        LocoDataset(loco_tree.root, loco_tree.category)


def _sample(dataset: LocoDataset, defect_type: str, stem: str):
    return next(
        s for s in dataset.samples("test") if s.defect_type == defect_type and s.stem == stem
    )


def test_gt_png_two_positive_values(loco_tree) -> None:
    mask = loco_tree.rect_mask(255, (0, 4, 0, 4))
    mask[10, 10] = 254
    path = loco_tree.write_image("ground_truth/logical_anomalies/000/000.png", mask)
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    with _raises_naming(path, "one positive value"):
        dataset.ground_truth(_sample(dataset, "logical_anomalies", "000"))


def test_gt_png_all_zero(loco_tree) -> None:
    empty = np.zeros((loco_tree.height, loco_tree.width), np.uint8)
    path = loco_tree.write_image("ground_truth/logical_anomalies/001/001.png", empty)
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    with _raises_naming(path, "all zero"):
        dataset.ground_truth(_sample(dataset, "logical_anomalies", "001"))


def test_unknown_pixel_value(loco_tree) -> None:
    path = loco_tree.write_image(
        "ground_truth/structural_anomalies/000/000.png", loco_tree.rect_mask(200, (0, 3, 0, 3))
    )
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    with _raises_naming(path, "pixel value 200"):
        dataset.ground_truth(_sample(dataset, "structural_anomalies", "000"))


def test_mask_size_mismatch(loco_tree) -> None:
    small = np.zeros((loco_tree.height // 2, loco_tree.width // 2), np.uint8)
    small[0, 0] = 254
    path = loco_tree.write_image("ground_truth/structural_anomalies/000/000.png", small)
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    with _raises_naming(path, "differs from the image size"):
        dataset.ground_truth(_sample(dataset, "structural_anomalies", "000"))


def test_ground_truth_of_good_sample_is_empty(loco_tree) -> None:
    dataset = LocoDataset(loco_tree.root, loco_tree.category)
    assert dataset.ground_truth(dataset.samples("validation")[0]) == []


# --- defects_config.json ---------------------------------------------------------------------


def _entry(**overrides: object) -> dict:
    entry = {
        "defect_name": "missing_part",
        "pixel_value": 255,
        "saturation_threshold": 6300,
        "relative_saturation": False,
    }
    entry.update(overrides)
    return entry


def _write(tmp_path: Path, entries: object) -> Path:
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_config_float_threshold_where_int_required(tmp_path: Path) -> None:
    path = _write(tmp_path, [_entry(saturation_threshold=6300.0)])
    with _raises_naming(path, "entry 0.*missing_part.*int"):
        parse_defects_config(path)


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.2, 1])
def test_config_relative_threshold_outside_unit_interval(tmp_path: Path, threshold) -> None:
    path = _write(
        tmp_path,
        [
            _entry(),
            _entry(pixel_value=254, relative_saturation=True, saturation_threshold=threshold),
        ],
    )
    with _raises_naming(path, r"entry 1.*\(0, 1\]"):
        parse_defects_config(path)


def test_config_relative_threshold_one_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, [_entry(relative_saturation=True, saturation_threshold=1.0)])
    assert parse_defects_config(path)[255].saturation_area(80) == 80


def test_config_duplicate_pixel_value(tmp_path: Path) -> None:
    path = _write(tmp_path, [_entry(), _entry(defect_name="scratch")])
    with _raises_naming(path, "entry 1.*already used by 'missing_part'"):
        parse_defects_config(path)


def test_config_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "defects_config.json"
    path.write_text('[{"defect_name": "x",', encoding="utf-8")
    with _raises_naming(path, "malformed JSON"):
        parse_defects_config(path)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"defect_name": "x"}, "list"),
        ([], "list"),
        (["x"], "entry 0 must be a JSON object"),
        ([{"defect_name": "x", "pixel_value": 255}], "keys"),
        ([_entry(extra=1)], "keys"),
        ([_entry(pixel_value=0)], "1..255"),
        ([_entry(pixel_value=256)], "1..255"),
        ([_entry(pixel_value=255.0)], "1..255"),
        ([_entry(pixel_value=True)], "1..255"),
        ([_entry(defect_name="")], "defect_name"),
        ([_entry(relative_saturation="false")], "relative_saturation"),
        ([_entry(saturation_threshold=0)], "positive int"),
        ([_entry(saturation_threshold=True)], "positive int"),
    ],
)
def test_config_type_rules(tmp_path: Path, entries: object, match: str) -> None:
    path = _write(tmp_path, entries)
    with _raises_naming(path, match):
        parse_defects_config(path)


def test_config_error_at_construction(loco_tree) -> None:
    path = loco_tree.write_config([_entry(saturation_threshold=40.0)])
    with _raises_naming(path, "int"):
        LocoDataset(loco_tree.root, loco_tree.category)
