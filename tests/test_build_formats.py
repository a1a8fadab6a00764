"""``python -m engine.build`` on every data format besides LOCO (tests/test_build.py): MVTec AD,
and a folder of good parts without bad images, with bad images, and with their masks. Each
writes an artifact and reports exactly the metrics its data allows, decided before training;
``tools.evaluate`` and ``tools.visualize`` read the same formats.

The data is the tiny synthetic pushpins category re-laid out, so every build is as small as the
LOCO one. Bad folder input fails before training, naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import build, pipeline
from engine.artifact import read_manifest
from engine.data.folder import FolderDataset
from engine.data.loco import LocoDataset
from engine.metrics import auroc, compute_mvtec_metrics, read_map
from engine.runtime import Runtime
from tools import evaluate, visualize

CATEGORY = "pushpins"
IMAGE_KEYS = {"image_auroc", "image_auroc_official", "image_auroc_per_defect"}
PIXEL_KEYS = IMAGE_KEYS | {"pixel_auroc", "au_pro_0.3"}
LOCO_TYPES = ("logical_anomalies", "structural_anomalies")


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _union_mask(dataset: LocoDataset, sample) -> np.ndarray:
    return np.logical_or.reduce([c.mask for c in dataset.ground_truth(sample)])


def as_mvtec(loco_root: Path, root: Path) -> Path:
    """The LOCO category in the MVTec AD layout: train/good = train + validation (the reader
    holds out its own validation), one 0/255 ``NNN_mask.png`` per anomalous test image."""
    loco = LocoDataset(loco_root, CATEGORY)
    folder = root / CATEGORY
    for split in ("train", "validation"):
        for sample in loco.samples(split):
            target = folder / "train" / "good" / f"{split}_{sample.image_path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.image_path, target)
    for sample in loco.samples("test"):
        target = folder / "test" / sample.defect_type / sample.image_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.image_path, target)
        if sample.label:
            mask = folder / "ground_truth" / sample.defect_type / f"{sample.stem}_mask.png"
            _save_mask(mask, _union_mask(loco, sample))
    return root


def as_folder(loco_root: Path, root: Path, bad: bool, masks: bool) -> Path:
    """The LOCO category as a folder: every good image in good/; with ``bad`` the anomalies in
    bad/ (``logical_000.png``...); with ``masks`` their masks, half named ``x.png``, half
    ``x_mask.png``."""
    loco = LocoDataset(loco_root, CATEGORY)
    folder = root / CATEGORY
    for split in ("train", "validation", "test"):
        for sample in loco.samples(split):
            if sample.label and not bad:
                continue
            prefix = sample.defect_type.split("_")[0] if sample.label else split
            target = folder / ("bad" if sample.label else "good") / f"{prefix}_{sample.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.image_path, target)
            if sample.label and masks:
                suffix = "_mask" if sample.stem.endswith(("0", "2")) else ""
                _save_mask(
                    folder / "masks" / f"{target.stem}{suffix}.png", _union_mask(loco, sample)
                )
    return root


def _build(root: Path, work: Path, args: list[str], *extra: str) -> dict:
    """Run the build CLI; the artifact, maps, data root and everything it printed."""
    artifact, maps = work / "artifact", work / "maps"
    argv = [f"--category={CATEGORY}", f"--data-root={root}", f"--out={artifact}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = build.main([*argv, f"--save-maps={maps}", *args, *extra])
    assert code == 0, printed.getvalue()
    return {"artifact": artifact, "maps": maps, "data": root, "out": printed.getvalue()}


@pytest.fixture(scope="module")
def mvtec_build(tmp_path_factory, tiny_loco: Path, tiny_build_args: list[str]) -> dict:
    work = tmp_path_factory.mktemp("mvtec_build")
    return _build(as_mvtec(tiny_loco, work / "data"), work, tiny_build_args)


@pytest.fixture(scope="module", params=["good", "bad", "masks"])
def folder_build(request, tmp_path_factory, tiny_loco: Path, tiny_build_args: list[str]) -> dict:
    """Built with --data-format folder: good/ only, good/ + bad/, good/ + bad/ + masks/."""
    work = tmp_path_factory.mktemp(f"folder_{request.param}")
    bad, masks = request.param != "good", request.param == "masks"
    root = as_folder(tiny_loco, work / "data", bad, masks)
    return {"kind": request.param, **_build(root, work, tiny_build_args, "--data-format=folder")}


def _plan_before_training(out: str, plan: str) -> None:
    """The build said which metrics it will report before it trained."""
    assert out.index(f"metrics: {plan}") < out.index("== train logical module")


@pytest.mark.slow
def test_mvtec_build_reports_image_pixel_auroc_and_pro(mvtec_build: dict) -> None:
    manifest = read_manifest(mvtec_build["artifact"])
    assert manifest["data"] == {
        "format": "mvtec",
        "evaluation": "pixel",
        "images": {"train": 10, "validation": 2},
        "test_images": {"good": 3, "anomalous": 6},
    }
    branches = {"logical", "structural", "positional", "composition", "fused"}
    assert set(manifest["metrics"]) == branches
    for branch, values in manifest["metrics"].items():
        assert set(values) == PIXEL_KEYS, branch
        assert set(values["image_auroc_per_defect"]) == set(LOCO_TYPES)
    out = mvtec_build["out"]
    assert "MVTec AD layout" in out and "AU-PRO@0.3" in out and "pixel AUROC" in out
    _plan_before_training(out, "pixel level")
    # The fused values are the exact metric of the saved maps.
    dataset_root = mvtec_build["data"] / CATEGORY
    maps, masks = [], []
    for path in sorted((mvtec_build["maps"] / CATEGORY / "test").rglob("*.tiff")):
        maps.append(read_map(path))
        kind = path.parent.name
        mask = dataset_root / "ground_truth" / kind / f"{path.stem}_mask.png"
        masks.append(np.asarray(Image.open(mask)) > 0 if kind != "good" else None)
    assert len(maps) == 9
    expected = compute_mvtec_metrics(maps, masks)
    fused = manifest["metrics"]["fused"]
    assert fused["image_auroc"] == pytest.approx(expected.image_auroc, abs=1e-9)
    assert fused["pixel_auroc"] == pytest.approx(expected.pixel_auroc, abs=1e-9)
    assert fused["au_pro_0.3"] == pytest.approx(expected.au_pro, abs=1e-9)


@pytest.mark.slow
def test_mvtec_evaluate_and_visualize_read_the_artifact(mvtec_build: dict, tmp_path: Path) -> None:
    argv = [f"--data-root={mvtec_build['data']}", f"--artifact={mvtec_build['artifact']}"]
    assert evaluate.main([*argv, f"--out={tmp_path}", "--device=cpu", "--no-progress"]) == 0
    measured = json.loads((tmp_path / "metrics.json").read_text())
    built = read_manifest(mvtec_build["artifact"])["metrics"]["fused"]
    assert set(measured) == PIXEL_KEYS - {"image_auroc_per_defect"}
    # One image per batch here, eight in the build: float32 noise only.
    for key in ("image_auroc", "pixel_auroc", "au_pro_0.3"):
        assert measured[key] == pytest.approx(built[key], abs=1e-4), key
    plots = tmp_path / "plots"
    argv = [f"--artifact={mvtec_build['artifact']}", f"--out={plots}", "--n=1"]
    argv += [f"--data-root={mvtec_build['data']}", "--device=cpu", "--no-progress"]
    assert visualize.main(argv) == 0
    curves = ["roc.png", "pro_fpr.png", "score_histogram.png"]
    sheets = ["false_alarms.png", "misses.png", "detections.png"]
    assert sorted(p.name for p in plots.iterdir()) == sorted(curves + sheets)


@pytest.mark.slow
def test_folder_build_writes_an_artifact_with_the_metrics_the_data_allows(
    folder_build: dict,
) -> None:
    kind = folder_build["kind"]
    manifest = read_manifest(folder_build["artifact"])
    Runtime.load(folder_build["artifact"], device="cpu")  # a complete, loadable artifact
    data = manifest["data"]
    assert data["format"] == "folder"
    # good/ holds 15 images; with bad/ 20 % of them are held out for testing first, then 20 %
    # of the rest for validation
    split = {"train": 12, "validation": 3} if kind == "good" else {"train": 10, "validation": 2}
    assert data["images"] == split
    assert len(manifest["validation_scores"]) == split["validation"]
    assert manifest["threshold"] in manifest["validation_scores"]
    out = folder_build["out"]
    if kind == "good":
        assert data["evaluation"] == "none" and data["test_images"] == {"good": 0, "anomalous": 0}
        assert manifest["metrics"] == {}
        _plan_before_training(out, "no test metrics")
        assert "evaluate on test: skipped" in out and "no test metrics" in out
        assert "threshold" in out and not list(folder_build["maps"].glob("**/*.tiff"))
        return
    assert data["test_images"] == {"good": 3, "anomalous": 6}
    expected_keys, level = (PIXEL_KEYS, "pixel") if kind == "masks" else (IMAGE_KEYS, "image")
    assert data["evaluation"] == level
    _plan_before_training(out, f"{level} level")
    for branch, values in manifest["metrics"].items():
        assert set(values) == expected_keys, branch
        assert set(values["image_auroc_per_defect"]) == {"bad"}
    assert "caught per defect type: bad " in out and "false-alarm rate" in out
    # The image AUROC is that of the scores the deployed engine gives the test images.
    rt = Runtime.load(folder_build["artifact"], device="cpu")
    scores: dict[int, list[float]] = {0: [], 1: []}
    for sample in FolderDataset(folder_build["data"], CATEGORY).samples("test"):
        image = np.array(Image.open(sample.image_path).convert("RGB"))
        scores[sample.label].append(rt(image, color="rgb").score)
    fused = manifest["metrics"]["fused"]
    assert fused["image_auroc"] == pytest.approx(auroc(scores[0], scores[1]), abs=1e-9)


@pytest.mark.slow
def test_folder_evaluate_reports_what_the_data_allows(
    folder_build: dict, tmp_path: Path, capsys
) -> None:
    argv = [f"--data-root={folder_build['data']}", f"--artifact={folder_build['artifact']}"]
    argv += [f"--out={tmp_path / 'out'}", "--device=cpu", "--no-progress"]
    if folder_build["kind"] == "good":
        assert evaluate.main(argv) == evaluate.EXIT_BAD_INPUT
        assert "nothing to evaluate" in capsys.readouterr().err
        assert not (tmp_path / "out" / "metrics.json").exists()
        return
    assert evaluate.main(argv) == 0
    measured = json.loads((tmp_path / "out" / "metrics.json").read_text())
    built = read_manifest(folder_build["artifact"])["metrics"]["fused"]
    assert set(measured) == set(built) - {"image_auroc_per_defect"}
    assert measured["image_auroc"] == pytest.approx(built["image_auroc"], abs=1e-9)


# ---- bad folder input fails before training, naming the file, writing nothing


@pytest.fixture
def folder_root(tiny_loco: Path, tmp_path: Path) -> Path:
    return as_folder(tiny_loco, tmp_path / "data", bad=True, masks=True)


def _no_training(*args, **kwargs):
    raise AssertionError("training started although the build should have refused earlier")


def _empty_good(folder: Path) -> Path:
    for image in (folder / "good").iterdir():
        image.unlink()
    return folder / "good"


def _unreadable_image(folder: Path) -> Path:
    path = folder / "good" / "train_003.png"
    path.write_bytes(b"not a png")
    return path


def _mask_without_image(folder: Path) -> Path:
    path = folder / "masks" / "scratch_9.png"
    shutil.copyfile(next((folder / "masks").iterdir()), path)
    return path


def _one_validation_image(folder: Path) -> Path:
    (folder / "validation").mkdir()
    shutil.copyfile(next((folder / "good").iterdir()), folder / "validation" / "v.png")
    return folder / "validation"


def _mask_of_another_size(folder: Path) -> Path:
    path = sorted((folder / "masks").iterdir())[0]
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    "damage",
    [
        _empty_good,
        _unreadable_image,
        _mask_without_image,
        _mask_of_another_size,
        _one_validation_image,
    ],
)
def test_bad_folder_input_fails_before_training(
    folder_root: Path, tmp_path: Path, monkeypatch, capsys, tiny_build_args, damage
) -> None:
    named = damage(folder_root / CATEGORY)
    monkeypatch.setattr(pipeline, "train_logical", _no_training)
    out = tmp_path / "art"
    argv = [f"--category={CATEGORY}", f"--data-root={folder_root}", f"--out={out}"]
    assert build.main([*argv, *tiny_build_args]) == build.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_auto_without_a_known_layout_names_the_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / CATEGORY / "images").mkdir(parents=True)
    out = tmp_path / "art"
    argv = [f"--category={CATEGORY}", f"--data-root={tmp_path}", f"--out={out}"]
    assert build.main([*argv, "--preset=cpu"]) == build.EXIT_BAD_INPUT
    assert f"error: {tmp_path / CATEGORY}: no known data layout" in capsys.readouterr().err
    assert not out.exists()


def test_folder_format_needs_a_data_root(tmp_path: Path, capsys) -> None:
    argv = [f"--category={CATEGORY}", f"--cache-dir={tmp_path}", "--data-format=folder"]
    assert build.main([*argv, "--preset=cpu"]) == build.EXIT_BAD_INPUT
    assert "--data-format folder needs --data-root" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
