"""tools.evaluate on a tiny LOCO category: the reference case of loco_evaluation.md §2.8(b);
and the refusals (bad --out, --device, failed writes) it shares with tools.visualize."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tools import visualize
from tools.evaluate import EXIT_BAD_INPUT, main

REPO = Path(__file__).resolve().parents[2]
CATEGORY = "grid"
SIZE = 20
DEFECTS_CONFIG = [
    {
        "defect_name": "absolute_30",
        "pixel_value": 255,
        "saturation_threshold": 30,
        "relative_saturation": False,
    },
    {
        "defect_name": "relative_1",
        "pixel_value": 254,
        "saturation_threshold": 1.0,
        "relative_saturation": True,
    },
    {
        "defect_name": "relative_half",
        "pixel_value": 253,
        "saturation_threshold": 0.5,
        "relative_saturation": True,
    },
]
# (type, stem, k of the base map, bump (rows, cols, amount), channels [(px, rows, cols)])
TEST_IMAGES = [
    ("good", "000", 0, None, []),
    ("good", "001", 1, None, []),
    ("good", "002", 2, None, []),
    ("logical_anomalies", "000", 3, ((2, 11), (2, 11), 0.5), [(255, (2, 11), (2, 11))]),
    (
        "logical_anomalies",
        "001",
        4,
        ((5, 8), (5, 14), 0.3),
        [(253, (5, 8), (0, 19)), (255, (14, 17), (14, 17))],
    ),
    ("structural_anomalies", "000", 5, ((0, 2), (0, 2), 0.8), [(254, (0, 3), (0, 3))]),
    ("structural_anomalies", "001", 6, ((10, 19), (10, 19), 0.2), [(254, (10, 19), (10, 19))]),
]
# The official evaluator's AU-sPRO on this case at limits 0.01, 0.05, 0.1, 0.3, 1.0.
OFFICIAL_AU_SPRO = {
    "logical_anomalies": [0.433828, 0.454028, 0.473222, 0.574391, 0.796748],
    "structural_anomalies": [0.335223, 0.348038, 0.373447, 0.459250, 0.682918],
    "mean": [0.384525, 0.401033, 0.423334, 0.516821, 0.739833],
}
LIMITS = ["0.01", "0.05", "0.1", "0.3", "1.0"]


def block(rows: tuple[int, int], cols: tuple[int, int]) -> tuple[slice, slice]:
    return slice(rows[0], rows[1] + 1), slice(cols[0], cols[1] + 1)


def reference_map(k: int, bump) -> np.ndarray:
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    anomaly_map = ((7 * i + 13 * j + 31 * k) % 97) / 97
    if bump is not None:
        rows, cols, amount = bump
        anomaly_map[block(rows, cols)] += amount
    return anomaly_map


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_dataset(root: Path) -> None:
    """The LOCO layout with 20×20 images, one PNG per GT channel and defects_config.json."""
    folder = root / CATEGORY
    image = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    for split in ("train", "validation"):
        save_png(folder / split / "good" / "000.png", image)
    for defect_type, stem, _, _, channels in TEST_IMAGES:
        save_png(folder / "test" / defect_type / f"{stem}.png", image)
        for index, (pixel_value, rows, cols) in enumerate(channels):
            mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
            mask[block(rows, cols)] = pixel_value
            save_png(folder / "ground_truth" / defect_type / stem / f"{index:03d}.png", mask)
    for defect_type in ("logical_anomalies", "structural_anomalies"):
        (folder / "ground_truth" / defect_type).mkdir(parents=True, exist_ok=True)
    (folder / "defects_config.json").write_text(json.dumps(DEFECTS_CONFIG))


def write_reference_maps(maps_root: Path) -> dict[tuple[str, str], Path]:
    """float64 TIFFs (the official evaluator reads any real dtype) in the official layout."""
    paths = {}
    for defect_type, stem, k, bump, _ in TEST_IMAGES:
        path = maps_root / CATEGORY / "test" / defect_type / f"{stem}.tiff"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, reference_map(k, bump))
        paths[defect_type, stem] = path
    return paths


@pytest.fixture
def setup(tmp_path: Path):
    write_dataset(tmp_path / "data")
    paths = write_reference_maps(tmp_path / "maps")
    argv = ["--data-root", str(tmp_path / "data"), "--category", CATEGORY]
    argv += ["--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "out"), "--no-progress"]
    return argv, paths, tmp_path / "out"


def test_cli_reproduces_the_official_metrics(setup, capsys: pytest.CaptureFixture) -> None:
    argv, _, out = setup
    assert main(argv) == 0
    content = json.loads((out / "metrics.json").read_text())
    for key, expected in OFFICIAL_AU_SPRO.items():
        got = [content["localization"]["auc_spro"][key][limit] for limit in LIMITS]
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=key)
    for key in ("logical_anomalies", "structural_anomalies", "mean"):
        assert content["classification"]["auc_roc"][key] == pytest.approx(5 / 6)
        assert content["classification"]["auc_roc_tie_correct"][key] == 1.0
    printed = capsys.readouterr().out
    assert "AU-sPRO@0.05" in printed and "0.401" in printed  # mean AU-sPRO@0.05 in the table
    assert str(out / "metrics.json") in printed


def test_cli_curve_max_distance_changes_the_thresholds(setup) -> None:
    argv, _, out = setup
    # A coarse resolution stops refining early: the numbers move away from the official ones.
    assert main([*argv, "--curve-max-distance", "0.5"]) == 0
    content = json.loads((out / "metrics.json").read_text())
    got = [content["localization"]["auc_spro"]["mean"][limit] for limit in LIMITS]
    assert not np.allclose(got, OFFICIAL_AU_SPRO["mean"], atol=1e-6)


def break_missing(paths):
    paths["structural_anomalies", "001"].unlink()
    return "missing anomaly map .*structural_anomalies/001.tiff"


def break_shape(paths):
    tifffile.imwrite(paths["logical_anomalies", "000"], np.zeros((10, 20), np.float32))
    return r"logical_anomalies/000.tiff has shape \(10, 20\), expected \(20, 20\)"


def break_nan(paths):
    anomaly_map = np.zeros((SIZE, SIZE), np.float32)
    anomaly_map[3, 4] = np.nan
    tifffile.imwrite(paths["good", "002"], anomaly_map)
    return "good/002.tiff contains NaN or Inf"


def break_stray(paths):
    tifffile.imwrite(paths["good", "000"].with_name("009.tif"), np.zeros((SIZE, SIZE)))
    return r"without a test image .*009\.tif"


@pytest.mark.parametrize("break_maps", [break_missing, break_shape, break_nan, break_stray])
def test_bad_maps_exit_2_without_writing(setup, capsys: pytest.CaptureFixture, break_maps) -> None:
    argv, paths, out = setup
    message = break_maps(paths)
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_bad_dataset_exits_2(setup, capsys: pytest.CaptureFixture) -> None:
    argv, _, out = setup
    argv[argv.index(CATEGORY)] = "no_such_category"
    assert main(argv) == EXIT_BAD_INPUT
    assert "category folder not found" in capsys.readouterr().err
    assert not out.exists()


def test_module_entry_point(setup) -> None:
    argv, _, out = setup
    run = subprocess.run(
        [sys.executable, "-m", "tools.evaluate", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert (out / "metrics.json").is_file()
    assert run.stdout.splitlines()[0].split()[:2] == ["AUROC", "AUROC"]


def test_out_that_is_a_file_exits_2_before_any_work(setup, capsys, monkeypatch) -> None:
    argv, _, out = setup
    out.write_text("not a folder")
    monkeypatch.setattr("tools.evaluate.open_dataset", _never_called)
    assert main(argv) == EXIT_BAD_INPUT
    assert "--out" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def test_unknown_device_is_an_argparse_error(setup, capsys) -> None:
    argv, _, _ = setup
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--device", "foo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'foo'" in capsys.readouterr().err


def test_disk_full_while_writing_metrics_exits_2(setup, capsys, monkeypatch) -> None:
    argv, _, _ = setup

    def disk_full(metrics, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "metrics.json"))

    monkeypatch.setattr("tools.evaluate.write_metrics_json", disk_full)
    assert main(argv) == EXIT_BAD_INPUT
    assert "No space left on device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_device_exits_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("engine.runtime.load_artifact", _never_called)
    argv = ["--data-root", str(tmp_path), "--artifact", str(tmp_path), "--device", "cuda"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert "no CUDA device" in capsys.readouterr().err


# tools.visualize shares these checks: its --out and --device are refused before any work too.
def test_visualize_refuses_a_file_as_out_and_an_unknown_device(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plots"
    out.write_text("mine")
    argv = ["--artifact", str(tmp_path / "artifact"), "--out", str(out), "--no-progress"]
    assert visualize.main(argv) == EXIT_BAD_INPUT
    assert "--out" in capsys.readouterr().err and out.read_text() == "mine"
    with pytest.raises(SystemExit) as exit_info:
        visualize.main([*argv, "--device", "gpu"])
    assert exit_info.value.code == 2


def test_visualize_maps_write_failures_to_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(visualize.Runtime, "load", lambda *a, **k: SimpleNamespace(category="x"))
    monkeypatch.setattr(visualize, "open_dataset", lambda *a: None)
    monkeypatch.setattr(visualize, "evaluate_category", lambda *a, **k: None)
    monkeypatch.setattr(visualize, "write_plots", disk_full)
    argv = ["--artifact", str(tmp_path), "--out", str(tmp_path / "plots"), "--no-progress"]
    assert visualize.main(argv) == EXIT_BAD_INPUT
    assert "No space left on device" in capsys.readouterr().err


def _never_called(*args, **kwargs):
    raise AssertionError("work started although the arguments should have been refused first")
