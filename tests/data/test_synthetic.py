"""engine.data.synthetic: LOCO layout, ground truth, config, determinism, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.loco import LocoDataset, parse_defects_config
from engine.data.synthetic import (
    CATEGORIES,
    generate,
    generate_category,
    get_category,
)
from engine.data.synthetic import writer as writer_module
from engine.data.synthetic.contact_sheet import contact_sheet
from engine.data.types import GOOD, LOGICAL, STRUCTURAL

COUNTS = {"n_train": 2, "n_validation": 1, "n_test_good": 1}


def _half(category: str) -> tuple[int, int]:
    w, h = get_category(category).design_size
    return w // 2, h // 2


def _sized_counts(category: str) -> dict[str, int]:
    """Enough anomalous images to cover every defect type of ``category`` once."""
    spec = get_category(category)
    n_logical, n_structural = len(spec.types_of(LOGICAL)), len(spec.types_of(STRUCTURAL))
    return {**COUNTS, "n_logical": n_logical, "n_structural": n_structural}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every category at half its default size, each defect type once."""
    root = tmp_path_factory.mktemp("synthetic")
    for name in CATEGORIES:
        generate_category(
            root, name, seed=3, size=_half(name), progress=False, **_sized_counts(name)
        )
    return root


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_category_names() -> None:
    assert set(CATEGORIES) == {
        "breakfast_box",
        "juice_bottle",
        "pushpins",
        "screw_bag",
        "splicing_connectors",
    }
    for name in CATEGORIES:
        spec = get_category(name)
        assert len(spec.types_of(LOGICAL)) >= 3 and len(spec.types_of(STRUCTURAL)) >= 3


@pytest.mark.parametrize("category", CATEGORIES)
def test_layout_and_naming(dataset_root: Path, category: str) -> None:
    root = dataset_root / category
    counts = _sized_counts(category)
    expected = {
        ("train", GOOD): counts["n_train"],
        ("validation", GOOD): counts["n_validation"],
        ("test", GOOD): counts["n_test_good"],
        ("test", LOGICAL): counts["n_logical"],
        ("test", STRUCTURAL): counts["n_structural"],
    }
    assert sorted(p.name for p in root.iterdir()) == [
        "defects_config.json",
        "ground_truth",
        "readme.txt",
        "test",
        "train",
        "validation",
    ]
    assert sorted(p.name for p in (root / "test").iterdir()) == [GOOD, LOGICAL, STRUCTURAL]
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == [LOGICAL, STRUCTURAL]
    sizes = set()
    for (split, folder), n in expected.items():
        names = sorted(p.name for p in (root / split / folder).iterdir())
        assert names == [f"{i:03d}.png" for i in range(n)]
        for name in names:
            with Image.open(root / split / folder / name) as im:
                assert im.format == "PNG" and im.mode == "RGB"
                sizes.add(im.size)
        if folder != GOOD:
            gt = sorted(p.name for p in (root / "ground_truth" / folder).iterdir())
            assert gt == [f"{i:03d}" for i in range(n)]
            for stem in gt:
                channels = sorted(p.name for p in (root / "ground_truth" / folder / stem).iterdir())
                assert channels and channels == [f"{k:03d}.png" for k in range(len(channels))]
    assert sizes == {_half(category)}
    assert category in (root / "readme.txt").read_text()


@pytest.mark.parametrize("category", CATEGORIES)
def test_defects_config(dataset_root: Path, category: str) -> None:
    path = dataset_root / category / "defects_config.json"
    entries = json.loads(path.read_text())
    spec = get_category(category)
    assert [e["defect_name"] for e in entries] == [d.name for d in spec.defect_types]
    assert [e["pixel_value"] for e in entries] == list(range(255, 255 - len(entries), -1))
    w, h = _half(category)
    for entry, defect in zip(entries, spec.defect_types):
        assert set(entry) == {
            "defect_name",
            "pixel_value",
            "saturation_threshold",
            "relative_saturation",
        }
        if entry["relative_saturation"]:
            assert type(entry["saturation_threshold"]) is float
            assert 0 < entry["saturation_threshold"] <= 1
        else:
            assert defect.kind == LOGICAL
            assert type(entry["saturation_threshold"]) is int
            assert 20 < entry["saturation_threshold"] < 0.2 * w * h
        if defect.kind == STRUCTURAL:
            assert entry["relative_saturation"] is True and entry["saturation_threshold"] == 1.0
    assert len(parse_defects_config(path)) == len(entries)  # the strict reader accepts it


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_pngs(dataset_root: Path, category: str) -> None:
    root = dataset_root / category
    config = json.loads((root / "defects_config.json").read_text())
    kind_of = {d.name: d.kind for d in get_category(category).defect_types}
    value_to_name = {e["pixel_value"]: e["defect_name"] for e in config}
    seen: set[str] = set()
    for folder in (LOGICAL, STRUCTURAL):
        for png in sorted((root / "ground_truth" / folder).rglob("*.png")):
            with Image.open(png) as im:
                assert im.mode == "L" and im.size == _half(category)
                mask = np.asarray(im)
            values = np.unique(mask[mask > 0])
            assert values.size == 1, png
            name = value_to_name[int(values[0])]
            assert kind_of[name] == folder
            seen.add(name)
            # non-empty and not the whole image
            assert 0 < int((mask > 0).sum()) < mask.size
    assert seen == set(kind_of)  # every type appears once the counts cover them


def test_loco_dataset_round_trip(dataset_root: Path) -> None:
    for category in CATEGORIES:
        dataset = LocoDataset(dataset_root, category)
        test = dataset.samples("test")
        assert len(dataset.samples("train")) == COUNTS["n_train"]
        anomalous = [s for s in test if s.label == 1]
        assert len(anomalous) == sum(
            len(get_category(category).types_of(k)) for k in (LOGICAL, STRUCTURAL)
        )
        for sample in anomalous:
            channels = dataset.ground_truth(sample)
            assert channels and all(c.area > 0 and c.saturation_area > 0 for c in channels)


def test_deterministic_and_category_independent(dataset_root: Path, tmp_path: Path) -> None:
    kwargs = {"seed": 3, "size": _half("pushpins"), "progress": False, **_sized_counts("pushpins")}
    first = generate_category(tmp_path / "a", "pushpins", **kwargs)
    again = generate_category(tmp_path / "b", "pushpins", **kwargs)
    assert _hashes(first) == _hashes(again)
    # the fixture generated every category in one run: pushpins alone must be identical to it
    assert _hashes(first) == _hashes(dataset_root / "pushpins")
    other = generate_category(tmp_path / "c", "pushpins", **{**kwargs, "seed": 4})
    differing = [k for k, v in _hashes(other).items() if _hashes(first).get(k) != v]
    assert any(k.startswith("train") for k in differing)


def test_images_do_not_depend_on_counts(dataset_root: Path, tmp_path: Path) -> None:
    few = {"n_train": 1, "n_validation": 0, "n_test_good": 0, "n_logical": 2, "n_structural": 0}
    folder = generate_category(
        tmp_path, "screw_bag", seed=3, size=_half("screw_bag"), progress=False, **few
    )
    full = _hashes(dataset_root / "screw_bag")
    for name, digest in _hashes(folder).items():
        if name.endswith(".png"):
            assert full[name] == digest, name


@pytest.mark.parametrize("category", CATEGORIES)
def test_anomalies_cycle_through_defect_types(dataset_root: Path, category: str) -> None:
    root = dataset_root / category
    config = json.loads((root / "defects_config.json").read_text())
    names = {e["pixel_value"]: e["defect_name"] for e in config}
    for kind in (LOGICAL, STRUCTURAL):
        for i, defect in enumerate(get_category(category).types_of(kind)):
            with Image.open(root / "ground_truth" / kind / f"{i:03d}" / "000.png") as im:
                assert names[int(np.asarray(im).max())] == defect.name


def test_default_size_and_counts(tmp_path: Path) -> None:
    folder = generate_category(
        tmp_path,
        "juice_bottle",
        n_train=1,
        n_validation=0,
        n_test_good=0,
        n_logical=0,
        n_structural=1,
        progress=False,
    )
    with Image.open(folder / "train" / "good" / "000.png") as im:
        assert im.size == (160, 320)
    assert list((folder / "validation" / "good").iterdir()) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: breakfast_box, juice_bottle"):
        generate_category(tmp_path, "bottle", progress=False)
    with pytest.raises(ValueError, match="valid:"):
        generate(tmp_path, ["pushpins", "nope"], progress=False)
    assert not any(tmp_path.iterdir())  # names are checked before anything is written
    with pytest.raises(ValueError, match="too small"):
        generate_category(tmp_path, "pushpins", size=(30, 20), progress=False)
    with pytest.raises(ValueError, match="size must be"):
        generate_category(tmp_path, "pushpins", size=(340.0, 200), progress=False)
    with pytest.raises(ValueError, match="n_train"):
        generate_category(tmp_path, "pushpins", n_train=-1, progress=False)
    with pytest.raises(ValueError, match="seed"):
        generate_category(tmp_path, "pushpins", seed=-2, progress=False)
    with pytest.raises(ValueError, match="unknown pushpins defect"):
        get_category("pushpins").build_scene(np.random.default_rng(0), "scratch")


def test_existing_folder_and_interrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = {"n_train": 1, "n_validation": 0, "n_test_good": 0, "n_logical": 1, "n_structural": 0}
    folder = generate_category(tmp_path, "pushpins", progress=False, **tiny)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_category(tmp_path, "pushpins", progress=False, **tiny)
    before = _hashes(folder)

    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    real_render = writer_module.render_image
    monkeypatch.setattr(writer_module, "render_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_category(tmp_path, "pushpins", seed=9, overwrite=True, progress=False, **tiny)
    with pytest.raises(KeyboardInterrupt):
        generate_category(tmp_path, "screw_bag", progress=False, **tiny)
    # the old category is untouched, the interrupted one does not exist, no temp folder is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pushpins"]
    assert _hashes(folder) == before


def test_contact_sheet(dataset_root: Path, tmp_path: Path) -> None:
    out = contact_sheet(dataset_root / "breakfast_box", tmp_path / "sheet.png", n_per_type=2)
    w, h = _half("breakfast_box")
    with Image.open(out) as im:
        assert im.width > 2 * w and im.height > 3 * h
        sheet = np.asarray(im.convert("RGB"))
    # outlines are drawn in magenta around the first GT channel of each anomalous tile
    assert np.all(sheet == (255, 0, 255), axis=2).sum() > 20
    with pytest.raises(ValueError, match="n_per_type"):
        contact_sheet(dataset_root / "breakfast_box", tmp_path / "x.png", n_per_type=0)
