"""tools.evaluate --maps on MVTec AD and folder data: the metrics each allows, and no more."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import open_dataset
from engine.metrics import auroc, auroc_official, compute_mvtec_metrics, map_path, write_map
from tools.evaluate import EXIT_BAD_INPUT, main

SIZE = (12, 16)  # (H, W)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mask(index: int) -> np.ndarray:
    mask = np.zeros(SIZE, np.uint8)
    mask[index : index + 4, 2 * index : 2 * index + 5] = 255
    return mask


def write_folder(root: Path, masks: bool) -> None:
    """good/ (10), bad/ (4) and, with ``masks``, masks/ (``x.png`` and ``x_mask.png`` names)."""
    rng = np.random.default_rng(0)
    for i in range(10):
        _save(root / "part" / "good" / f"g{i}.png", rng.integers(0, 256, (*SIZE, 3), np.uint8))
    for i in range(4):
        _save(root / "part" / "bad" / f"b{i}.png", rng.integers(0, 256, (*SIZE, 3), np.uint8))
        if masks:
            _save(root / "part" / "masks" / f"b{i}{'_mask' if i % 2 else ''}.png", _mask(i))


def write_mvtec(root: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(6):
        _save(
            root / "part" / "train" / "good" / f"{i:03d}.png",
            rng.integers(0, 256, (*SIZE, 3), np.uint8),
        )
    for kind, count in (("good", 2), ("crack", 2), ("cut", 1)):
        for i in range(count):
            _save(
                root / "part" / "test" / kind / f"{i:03d}.png",
                rng.integers(0, 256, (*SIZE, 3), np.uint8),
            )
            if kind != "good":
                _save(root / "part" / "ground_truth" / kind / f"{i:03d}_mask.png", _mask(i))


def write_test_maps(
    root: Path, maps_root: Path
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Noise maps with a bump inside each anomaly's mask (its whole image without one), written
    in the official layout; returns the maps and the masks (None for good images)."""
    dataset = open_dataset(root, "part")
    rng = np.random.default_rng(2)
    maps, masks = [], []
    for k, sample in enumerate(dataset.samples("test")):
        anomaly_map = rng.random(SIZE).astype(np.float32)
        channels = dataset.ground_truth(sample)
        mask = channels[0].mask if channels else None
        if sample.label:
            region = mask if mask is not None else np.ones(SIZE, bool)
            anomaly_map[region] += 0.3 + 0.1 * k
        write_map(map_path(maps_root, sample), anomaly_map)
        maps.append(anomaly_map)
        masks.append(mask)
    return maps, masks


def _run(root: Path, tmp_path: Path, *extra: str) -> dict:
    argv = [f"--data-root={root}", "--category=part", f"--maps={tmp_path / 'maps'}"]
    assert main([*argv, f"--out={tmp_path / 'out'}", "--no-progress", *extra]) == 0
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_folder_without_masks_gives_image_auroc_only(tmp_path: Path, capsys) -> None:
    write_folder(tmp_path / "data", masks=False)
    maps, _ = write_test_maps(tmp_path / "data", tmp_path / "maps")
    content = _run(tmp_path / "data", tmp_path)
    scores = np.array([m.max() for m in maps])
    good, bad = scores[:2], scores[2:]  # 2 held-out good images, then the 4 bad ones
    assert content == {
        "image_auroc": auroc(good, bad),
        "image_auroc_official": auroc_official(good, bad),
    }
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "pixel AUROC" not in printed


@pytest.mark.parametrize("layout", ["folder", "mvtec"])
def test_masks_give_pixel_auroc_and_the_exact_pro(tmp_path: Path, capsys, layout: str) -> None:
    if layout == "folder":
        write_folder(tmp_path / "data", masks=True)
    else:
        write_mvtec(tmp_path / "data")
    maps, masks = write_test_maps(tmp_path / "data", tmp_path / "maps")
    content = _run(tmp_path / "data", tmp_path, f"--data-format={layout}")
    expected = compute_mvtec_metrics(maps, masks)
    assert content == {
        "image_auroc": expected.image_auroc,
        "image_auroc_official": expected.image_auroc_official,
        "pixel_auroc": expected.pixel_auroc,
        "au_pro_0.3": expected.au_pro,
    }
    assert 0 < expected.au_pro < 1 and expected.pixel_auroc > 0.5
    assert "AU-PRO@0.3" in capsys.readouterr().out


def test_good_images_only_have_nothing_to_evaluate(tmp_path: Path, capsys) -> None:
    for i in range(4):
        _save(tmp_path / "data" / "part" / "good" / f"g{i}.png", np.zeros((*SIZE, 3), np.uint8))
    argv = [f"--data-root={tmp_path / 'data'}", "--category=part", f"--maps={tmp_path}"]
    assert main([*argv, f"--out={tmp_path / 'out'}"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'part'}: nothing to evaluate" in err and "add images" in err
    assert not (tmp_path / "out").exists()
