"""The build refuses, before any work, what would destroy user data or fail late.

Most cases give argv that must fail before :func:`engine.pipeline.build_category` (or before
training) runs; those steps are replaced by a function that fails the test if it is reached.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import build, evaluation, pipeline, preflight
from engine.artifact import ArtifactError
from engine.config import cpu_build_preset
from engine.data.loco import LocoDataset
from engine.preflight import checkpoint_folder, data_fingerprint
from engine.train import LAST_CHECKPOINT


def _forbidden(*args, **kwargs):
    raise AssertionError("work started although the build should have refused earlier")


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the build gets as far as building a category."""
    monkeypatch.setattr(build, "build_category", _forbidden)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if training starts."""
    monkeypatch.setattr(pipeline, "train_logical", _forbidden)


@pytest.fixture
def loco_copy(tiny_loco: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny pushpins category (tests may damage it): the data root."""
    root = tmp_path / "data"
    shutil.copytree(tiny_loco / "pushpins", root / "pushpins")
    return root


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _argv(data: Path, out: Path | str, *extra: str) -> list[str]:
    return ["--category=pushpins", f"--data-root={data}", f"--out={out}", *extra]


# ---- nothing at --out that is not an engine artifact is replaced (issue 10, item 1)


def test_out_folder_holding_other_things_is_refused_and_kept(
    tiny_loco: Path, tmp_path: Path, monkeypatch, capsys, no_build, tiny_build_args
) -> None:
    monkeypatch.chdir(tmp_path)
    artifacts = tmp_path / "artifacts"
    for name in ("pushpins", "screw_bag"):
        (artifacts / name).mkdir(parents=True)
        (artifacts / name / "manifest.json").write_text(f'{{"category": "{name}"}}')
    (artifacts / "README.txt").write_text("our engines, do not delete")
    before = _tree(artifacts)
    assert build.main(_argv(tiny_loco, "artifacts", *tiny_build_args)) == build.EXIT_BAD_INPUT
    assert "artifacts" in capsys.readouterr().err
    assert _tree(artifacts) == before


def test_foreign_out_is_refused_before_synthetic_data_is_generated(
    tmp_path: Path, capsys, no_build
) -> None:
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    cache = tmp_path / "cache"
    argv = ["--category=pushpins", f"--cache-dir={cache}", f"--out={out}", "--preset=cpu"]
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert str(out) in capsys.readouterr().err
    assert not cache.exists() and (out / "photos" / "cat.jpg").is_file()


@pytest.mark.parametrize("fresh", [[], ["--fresh"]], ids=["resume", "fresh"])
def test_checkpoint_folder_not_made_by_the_engine_is_refused(
    tiny_loco: Path, tmp_path: Path, capsys, no_build, tiny_build_args, fresh
) -> None:
    out = tmp_path / "art"
    checkpoints = checkpoint_folder(out)
    checkpoints.mkdir()
    (checkpoints / LAST_CHECKPOINT).write_bytes(b"x")
    (checkpoints / "thesis.tex").write_text("months of work")
    before = _tree(checkpoints)
    argv = _argv(tiny_loco, out, *tiny_build_args, *fresh)
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert "thesis.tex" in capsys.readouterr().err
    assert _tree(checkpoints) == before


def test_library_build_refuses_a_foreign_out_too(
    tiny_loco: Path, tmp_path: Path, no_training
) -> None:
    out = tmp_path / "art"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError):
        pipeline.build_category(tiny_loco, "pushpins", out, cpu_build_preset(), torch.device("cpu"))
    assert (out / "notes.txt").read_text() == "mine"


# ---- category names are plain folder names (issue 10, item 2)


def test_category_path_cannot_reach_the_data(
    loco_copy: Path, tmp_path: Path, monkeypatch, capsys, no_build, tiny_build_args
) -> None:
    # The default --out, artifacts/../data/tiny, would be the dataset folder itself.
    monkeypatch.chdir(tmp_path)
    (loco_copy / "pushpins").rename(loco_copy / "tiny")
    before = _tree(loco_copy)
    argv = ["--category=../data/tiny", "--data-root=data", *tiny_build_args]
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert "not a plain folder name" in capsys.readouterr().err
    assert _tree(loco_copy) == before
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("name", ["/tmp", "a/b", "..", ".hidden", ""])
def test_bad_category_names_are_refused_without_data_root(
    tmp_path: Path, capsys, no_build, name: str
) -> None:
    argv = [f"--category={name}", f"--cache-dir={tmp_path}", "--preset=cpu"]
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert "not a plain folder name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- every option is checked and converted before any work (issue 10, item 12)


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("train.lr=abc", "train.lr expects a number"),
        ("logical.image_size=abc", "logical.image_size expects an integer"),
        ("train.betas=0.5", "train.betas expects 2 comma-separated values"),
        ("train.epochs=2.5", "train.epochs expects an integer"),
        ("train.amp=maybe", "train.amp expects true or false"),
        ("allow_random=2", "allow_random expects true or false"),
    ],
)
def test_set_values_of_the_wrong_type_exit_2_naming_field_and_type(
    tiny_loco: Path, tmp_path: Path, capsys, no_build, assignment: str, expected: str
) -> None:
    argv = _argv(tiny_loco, tmp_path / "art", "--preset=cpu", "--device=cpu", f"--set={assignment}")
    assert build.main(argv) == build.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_set_words_become_real_booleans() -> None:
    config = build.apply_overrides(cpu_build_preset(), ["train.amp=no"])
    assert config.train.amp is False
    config = build.apply_overrides(config, ["train.amp=yes", "train.betas=0.4,0.9"])
    assert config.train.amp is True and config.train.betas == (0.4, 0.9)


def test_save_maps_that_cannot_be_written_exit_2(
    tiny_loco: Path, tmp_path: Path, capsys, no_build, tiny_build_args
) -> None:
    a_file = tmp_path / "maps.tiff"
    a_file.write_text("mine")
    for target in (a_file, a_file / "maps"):
        argv = _argv(tiny_loco, tmp_path / "art", *tiny_build_args, f"--save-maps={target}")
        assert build.main(argv) == build.EXIT_BAD_INPUT
        assert "--save-maps" in capsys.readouterr().err
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_save_maps_in_a_read_only_folder_exits_2(
    tiny_loco: Path, tmp_path: Path, capsys, no_build, tiny_build_args
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    argv = _argv(tiny_loco, tmp_path / "art", *tiny_build_args, f"--save-maps={locked / 'm'}")
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "shown"),
    [
        ("Flat", "Flat"),
        ("IVF1024,PQ64", "IVF1024,PQ64"),
        ("faiss_hnsw", "HNSW32"),  # an old name, read as its factory string
        ("faiss_gpu", "faiss_gpu"),
    ],
)
def test_index_kind_that_cannot_run_here_exits_2(
    tiny_loco: Path, tmp_path: Path, capsys, monkeypatch, no_build, tiny_build_args, kind, shown
) -> None:
    monkeypatch.setattr(preflight, "faiss_available", lambda: False)
    argv = _argv(tiny_loco, tmp_path / "art", *tiny_build_args, f"--set=structural.index={kind}")
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert f"structural.index={shown} needs FAISS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("index=bogus", "structural.index='bogus' is not a FAISS index factory string"),
        ("index=HNSW0", "structural.index='HNSW0': a size of 0"),
        ("index_params=efSearch", "structural.index_params='efSearch'"),
    ],
)
def test_misspelt_index_setting_exits_2_before_any_work(
    tiny_loco: Path, tmp_path: Path, capsys, no_build, tiny_build_args, assignment, message
) -> None:
    pytest.importorskip("faiss")
    argv = _argv(tiny_loco, tmp_path / "art", *tiny_build_args, f"--set=structural.{assignment}")
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(
    ("index", "params", "message"),
    [
        ("IVF64,PQ64", "", "structural.index='IVF64,PQ64' cannot index the "),
        ("HNSW32", "nprobe=8", "structural.index_params: nprobe=8 does not apply"),
    ],
)
def test_index_that_does_not_fit_the_features_exits_2_before_training(
    tiny_loco: Path, tmp_path: Path, capsys, no_training, tiny_build_args, index, params, message
) -> None:
    """The features' dimension (compact: the backbone's rank) is known once the models are
    built; 64 sub-quantisers divide none of the small ones."""
    pytest.importorskip("faiss")
    settings = [f"--set=structural.index={index}", f"--set=structural.index_params={params}"]
    argv = _argv(tiny_loco, tmp_path / "art", *tiny_build_args, *settings)
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_setting_an_artifact_cannot_record_exits_2_before_training(
    tiny_loco: Path, tmp_path: Path, capsys, no_training, tiny_build_args
) -> None:
    """The manifest bounds the settings inference reads; the build checks them first instead of
    failing when it saves the artifact, after all the work."""
    argv = _argv(
        tiny_loco, tmp_path / "art", *tiny_build_args, "--set=composition.kmeans_iterations=70000"
    )
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert "composition.kmeans_iterations=70000: an artifact records" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_faiss_gpu_without_gpu_faiss_exits_2(
    tiny_loco: Path, tmp_path: Path, capsys, monkeypatch, no_build, tiny_build_args
) -> None:
    monkeypatch.setattr(preflight, "faiss_gpu_available", lambda: False)
    monkeypatch.setattr(preflight, "faiss_available", lambda: True)
    argv = _argv(tiny_loco, tmp_path / "art", *tiny_build_args, "--set=structural.index=faiss_gpu")
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert "GPU support" in capsys.readouterr().err


def test_disk_full_exits_2_with_the_message(
    tiny_loco: Path, tmp_path: Path, capsys, monkeypatch, tiny_build_args
) -> None:
    def disk_full(*args, **kwargs):
        error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m" / "0.tiff"))
        error.add_note("the fused maps written by this run were deleted")
        raise error

    monkeypatch.setattr(build, "build_category", disk_full)
    assert build.main(_argv(tiny_loco, tmp_path / "art", *tiny_build_args)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "were deleted" in err


# ---- every input is validated before training (issue 10, item 16)


def _mask_of_wrong_size(data: Path) -> str:
    mask = next((data / "pushpins" / "ground_truth" / "structural_anomalies").rglob("*.png"))
    Image.fromarray(np.full((7, 9), 255, np.uint8)).save(mask)
    return "differs from the image size"


def _mask_value_not_in_config(data: Path) -> str:
    mask = next((data / "pushpins" / "ground_truth" / "logical_anomalies").rglob("*.png"))
    with Image.open(mask) as im:
        values = np.asarray(im).copy()
    values[values > 0] = 7
    Image.fromarray(values).save(mask)
    return "has no entry in"


def _truncated_test_image(data: Path) -> str:
    image = data / "pushpins" / "test" / "good" / "002.png"
    image.write_bytes(image.read_bytes()[:200])
    return "002.png"


def _one_validation_image(data: Path) -> str:
    # Without anomalous test images a build runs (no test metrics); without two validation
    # images it cannot calibrate.
    for image in sorted((data / "pushpins" / "validation" / "good").iterdir())[1:]:
        image.unlink()
    return "calibration needs at least 2"


def _one_training_image(data: Path) -> str:
    # The cpu preset's composition branch models the spread of the training images.
    for image in sorted((data / "pushpins" / "train" / "good").iterdir())[1:]:
        image.unlink()
    return "the composition branch needs at least 2"


def _zero_saturation_area(data: Path) -> str:
    config_path = data / "pushpins" / "defects_config.json"
    entries = json.loads(config_path.read_text())
    for entry in entries:
        entry.update(relative_saturation=True, saturation_threshold=1e-9)
    config_path.write_text(json.dumps(entries))
    return "saturation area 0"


@pytest.mark.parametrize(
    "damage",
    [
        _mask_of_wrong_size,
        _mask_value_not_in_config,
        _truncated_test_image,
        _one_validation_image,
        _one_training_image,
        _zero_saturation_area,
    ],
)
def test_bad_test_data_fails_before_training_and_leaves_nothing(
    loco_copy: Path, tmp_path: Path, capsys, no_training, tiny_build_args, damage
) -> None:
    message = damage(loco_copy)
    out, maps = tmp_path / "art", tmp_path / "maps"
    argv = _argv(loco_copy, out, *tiny_build_args, f"--save-maps={maps}")
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_failed_evaluation_deletes_the_maps_it_wrote(
    tiny_loco: Path, tmp_path: Path, monkeypatch
) -> None:
    dataset = LocoDataset(tiny_loco, "pushpins")
    written: list[Path] = []

    def write_map_then_fill_the_disk(path: Path, anomaly_map: np.ndarray) -> None:
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"map")
        written.append(path)

    class Detector:
        device = torch.device("cpu")
        branch_names = ("logical", "structural")

        def __call__(self, frames):
            return frames

    monkeypatch.setattr(evaluation, "write_map", write_map_then_fill_the_disk)
    monkeypatch.setattr(
        evaluation, "branch_only", lambda frames, branch, detector: frames[..., 0].float()
    )
    with pytest.raises(OSError, match="No space left") as error:
        evaluation.evaluate(Detector(), dataset, tmp_path / "maps", progress=False)
    assert "2 of 9 fused maps" in " ".join(error.value.__notes__)
    assert written and not any(p.exists() for p in written)


# ---- checkpoints carry a data fingerprint; --fresh starts over (issue 10, item 11)


def test_data_fingerprint_follows_the_content_not_the_copy(loco_copy: Path, tmp_path: Path):
    original = data_fingerprint(LocoDataset(loco_copy, "pushpins"))
    moved = tmp_path / "elsewhere"
    shutil.copytree(loco_copy, moved)  # new mtimes, new root: same data
    for image in (moved / "pushpins" / "train" / "good").iterdir():
        os.utime(image, (1, 1))
    assert data_fingerprint(LocoDataset(moved, "pushpins")) == original
    # The same size, one pixel different.
    image = moved / "pushpins" / "validation" / "good" / "000.png"
    with Image.open(image) as im:
        pixels = np.asarray(im).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(image)
    changed = data_fingerprint(LocoDataset(moved, "pushpins"))
    assert changed != original
    # Test images are not what training depends on.
    test_image = moved / "pushpins" / "test" / "good" / "000.png"
    test_image.write_bytes((moved / "pushpins" / "test" / "good" / "001.png").read_bytes())
    assert data_fingerprint(LocoDataset(moved, "pushpins")) == changed


def test_damaged_checkpoint_names_fresh_and_fresh_discards_it(
    tiny_loco: Path, tmp_path: Path, capsys, monkeypatch, tiny_build_args
) -> None:
    out = tmp_path / "art"
    checkpoints = checkpoint_folder(out)
    checkpoints.mkdir()
    (checkpoints / LAST_CHECKPOINT).write_bytes(b"half a checkpoint")
    argv = _argv(tiny_loco, out, *tiny_build_args)
    assert build.main(argv) == build.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--fresh" in err and "checkpoint_dir" not in err

    seen = {}

    def record_and_stop(model, train_set, val_set, cfg, folder, *args, **kwargs):
        seen["folder"], seen["fingerprint"] = folder, kwargs.get("fingerprint")
        seen["left"] = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_logical", record_and_stop)
    assert build.main([*argv, "--fresh"]) == build.EXIT_INTERRUPTED
    assert seen["folder"] == checkpoints and seen["left"] == []
    assert set(seen["fingerprint"]) == {"data", "weights", "text prior"}
