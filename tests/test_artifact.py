"""engine.artifact on tiny real artifacts: what may be replaced and what loads (the writer's durable
swap: tests/reliability/test_durable_swap.py)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import runpy
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from engine.artifact import (
    FORMAT_VERSION,
    MANIFEST,
    ArtifactError,
    load_artifact,
    read_manifest,
)
from engine.artifact_manifest import parse_manifest
from engine.calibrate import BranchStats
from engine.detector import Detector

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    return tiny["tiny_detector"](0)


@pytest.fixture
def art(built, tmp_path: Path) -> Path:
    """A fresh tiny artifact at ``tmp_path / "art"`` (marker "A")."""
    return tiny["save"](tmp_path / "art", *built)


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


DELETE = object()


def setting(*keys: str, value: object):
    """An edit that sets (or with ``DELETE`` removes) the manifest field at ``keys``."""

    def edit(manifest: dict) -> None:
        for key in keys[:-1]:
            manifest = manifest[key]
        if value is DELETE:
            del manifest[keys[-1]]
        else:
            manifest[keys[-1]] = value

    return edit


# ----------------------------------------------------------------------------- round trip


def test_round_trip_keeps_weights_calibration_and_threshold(built, art: Path) -> None:
    detector, manifest = load_artifact(art)
    assert tiny["fingerprint"](detector) == tiny["fingerprint"](built[0])
    assert detector.stats == built[0].stats
    assert detector.weights == built[0].weights
    assert manifest["threshold"] == 1.5 and manifest["format_version"] == FORMAT_VERSION
    assert detector.fusion.threshold.item() == detector.fusion.threshold_value == 1.5
    assert set(manifest["files"]) == {"logical.pt", "structural.pt"}
    assert names_in(art.parent) == ["art"]  # no temp folder left behind


def test_weights_stored_in_another_layout_load_row_major(built, art: Path) -> None:
    # assign=True keeps a tensor's strides: a channels-last conv weight would be copied on
    # every call and miss the fast CPU kernels
    state = torch.load(art / "logical.pt", weights_only=True)
    permuted = {
        k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v.t().contiguous().t()
        for k, v in state.items()
        if v.dim() in (2, 4)
    }
    permuted = state | permuted
    assert any(not v.is_contiguous() for v in permuted.values())
    torch.save(permuted, art / "logical.pt")
    tiny["relist"](art, "logical.pt")
    detector, _ = load_artifact(art)
    assert all(p.is_contiguous() for p in detector.logical.state_dict().values())
    assert tiny["fingerprint"](detector) == tiny["fingerprint"](built[0])


# ------------------------------------------------------------- the exact file set (item 3)


def test_empty_files_listing_is_refused(art: Path) -> None:
    tiny["edit_manifest"](art, setting("files", value={}))
    with pytest.raises(ArtifactError, match="files must list exactly"):
        read_manifest(art)


@pytest.mark.parametrize("change", ["unlisted weights", "listed extra"])
def test_listing_must_be_exactly_the_artifact_files(art: Path, change: str) -> None:
    if change == "unlisted weights":
        tiny["edit_manifest"](art, setting("files", "structural.pt", value=DELETE))
    else:
        (art / "extra.bin").write_bytes(b"x")
        tiny["relist"](art, "extra.bin")
    with pytest.raises(ArtifactError, match="files must list exactly"):
        load_artifact(art)


def test_unlisted_file_in_the_folder_is_refused(art: Path) -> None:
    (art / "notes.txt").write_text("not part of the build")
    with pytest.raises(ArtifactError, match=r"does not list: 'notes\.txt'"):
        load_artifact(art)


# ------------------------------------------------ one read, hashed and deserialised (item 4)


def test_load_deserialises_the_bytes_it_hashed(
    built, art: Path, tmp_path: Path, monkeypatch
) -> None:
    """A rebuild swapping the folder between hashing and deserialising must not mix builds."""
    detector, config = copy.deepcopy(built[0]), built[1]
    other = tiny["save"](tmp_path / "b" / "art", tiny["rebuilt"](detector, 1), config, marker="B")
    real_load = torch.load

    def swap_then_load(*args, **kwargs):
        if other.exists():
            os.replace(art, tmp_path / "a_old")
            os.replace(other, art)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", swap_then_load)
    loaded, manifest = load_artifact(art)
    assert manifest["marker"] == "A"
    assert tiny["fingerprint"](loaded) == tiny["fingerprint"](built[0])


def test_verify_false_skips_hashing_but_not_the_size_check(art: Path) -> None:
    (art / "structural.pt").write_bytes(b"short")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(art, verify=False)


# ------------------------------------------------------------- no path leaves the folder (item 5)


@pytest.mark.parametrize(
    "name", ["../outside.bin", "/tmp/outside.bin", "sub\\x.bin", "./logical.pt", "a//b"]
)
def test_files_outside_the_folder_are_refused(art: Path, name: str) -> None:
    outside = art.parent / "outside.bin"
    outside.write_bytes(b"secret")
    entry = {"sha256": hashlib.sha256(b"secret").hexdigest(), "bytes": 6}
    tiny["edit_manifest"](art, setting("files", name, value=entry))
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        read_manifest(art)


def test_symlinked_file_is_refused(art: Path) -> None:
    copy = art.parent / "structural_copy.pt"
    shutil.copy(art / "structural.pt", copy)
    (art / "structural.pt").unlink()
    (art / "structural.pt").symlink_to(copy)
    with pytest.raises(ArtifactError, match="symbolic link"):
        read_manifest(art)


def test_fifo_is_refused_without_hanging(art: Path) -> None:
    (art / "logical.pt").unlink()
    os.mkfifo(art / "logical.pt")
    with pytest.raises(ArtifactError, match="not a regular file"):
        read_manifest(art)


# ------------------------------------------------------- every failure is an ArtifactError (item 6)


def _garbage_weights(art: Path, payload: object) -> None:
    torch.save(payload, art / "logical.pt")
    tiny["relist"](art, "logical.pt")


MALFORMED = {
    "calibration-list": (setting("calibration", value=[]), "calibration must be an object"),
    "calibration-branch-missing": (
        setting("calibration", "structural", value=DELETE),
        "calibration.structural is missing",
    ),
    "std-string": (setting("calibration", "logical", "std", value="1"), "calibration.logical.std"),
    "backbone-string": (setting("backbones", "logical", value="x"), "backbones.logical must be"),
    "unknown-arch": (setting("backbones", "structural", "arch", value="vgg"), "structural.arch"),
    "text-prior-list": (setting("text_prior", value=[]), "text_prior must be an object"),
    "text-dim-string": (setting("text_prior", "dim", value="8"), "text_prior.dim"),
    "files-list": (setting("files", value=[]), "files must be an object"),
    "files-entry-string": (setting("files", "logical.pt", value="x"), r"files\['logical.pt'\]"),
    "negative-bytes": (setting("files", "logical.pt", "bytes", value=-1), "bytes must be"),
    "sha-int": (setting("files", "logical.pt", "sha256", value=5), "sha256 must be"),
    "no-config": (setting("config", value=DELETE), "config is missing"),
    "config-section-int": (setting("config", "logical", value=3), "config.logical must be an"),
    "image-size-string": (
        setting("config", "logical", "image_size", value="abc"),
        "image_size must be an integer",
    ),
    "image-size-bool": (
        setting("config", "logical", "image_size", value=True),
        "image_size must be an integer",
    ),
    "huge-block-count": (setting("config", "logical", "decoder_blocks", value=[10**30]), "at most"),
    "other-codebook-size": (
        setting("config", "logical", "codebook_size", value=64),
        "do not fit the model",
    ),
    "other-feature-dim": (
        setting("config", "structural", "feature_dim", value=16),
        "memory bank must be",
    ),
    "unknown-index": (setting("structural_index", "kind", value="annoy"), "structural_index.kind"),
    "no-threshold": (setting("threshold", value=DELETE), "threshold is missing"),
    "threshold-string": (setting("threshold", value="7.5"), "threshold must be a finite number"),
    "category-list": (setting("category", value=["tiny"]), "category must be a string"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_manifest_fields_are_artifact_errors(art: Path, case: str) -> None:
    edit, message = MALFORMED[case]
    tiny["edit_manifest"](art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"\xff\xfe{}", "UnicodeDecodeError", id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "RecursionError", id="deep-nesting"),
        pytest.param(b"[1, 2]", "not an engine manifest", id="list"),
        pytest.param(b"{not json", "unreadable manifest", id="syntax"),
    ],
)
def test_undecodable_manifest_is_an_artifact_error(art: Path, data: bytes, message: str) -> None:
    (art / MANIFEST).write_bytes(data)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("pickle", "cannot be loaded"),
        ("truncated", "cannot be loaded"),
        pytest.param([1, 2], "not a state dict", id="list"),
        pytest.param({"decoder.text": torch.zeros(3)}, "do not fit the model", id="wrong-keys"),
    ],
)
def test_undeserialisable_weights_are_artifact_errors(art: Path, payload, message: str) -> None:
    if payload == "pickle":
        (art / "logical.pt").write_bytes(b"\x80\x04K\x01.")  # a plain pickle, not a torch file
        tiny["relist"](art, "logical.pt")
    elif payload == "truncated":
        data = (art / "logical.pt").read_bytes()
        (art / "logical.pt").write_bytes(data[: len(data) // 2])
        tiny["relist"](art, "logical.pt")
    else:
        _garbage_weights(art, payload)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


def test_missing_manifest_means_incomplete(tmp_path: Path) -> None:
    (tmp_path / "art").mkdir()
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        read_manifest(tmp_path / "art")


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no artifact folder"):
        read_manifest(tmp_path / "nope")


def test_other_format_version_is_refused(art: Path) -> None:
    tiny["edit_manifest"](art, setting("format_version", value=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match="format version"):
        read_manifest(art)


def test_version_2_is_refused_and_told_why(art: Path) -> None:
    tiny["edit_manifest"](art, setting("format_version", value=2))
    with pytest.raises(ArtifactError, match=r"another basis than its memory bank.*rebuild"):
        read_manifest(art)


def test_tampered_file_is_refused(art: Path) -> None:
    data = bytearray((art / "logical.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "logical.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_manifest(art)


def test_edited_manifest_is_refused(art: Path) -> None:
    text = (art / MANIFEST).read_text().replace('"threshold": 1.5', '"threshold": 9.5')
    (art / MANIFEST).write_text(text)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_manifest(art)


def test_missing_file_is_refused(art: Path) -> None:
    (art / "structural.pt").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_manifest(art)


# -------------------------------------------------------------------- fail closed (item 7)


NON_FINITE = {
    "nan-threshold": (setting("threshold", value=float("nan")), "threshold must be a finite"),
    "inf-threshold": (setting("threshold", value=float("inf")), "threshold must be a finite"),
    "nan-mean": (setting("calibration", "logical", "mean", value=float("nan")), "mean must be"),
    "zero-std": (
        setting("calibration", "structural", "std", value=0),
        "structural.std must be a finite number in",
    ),
}


@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_threshold_or_calibration_is_refused(art: Path, case: str) -> None:
    edit, message = NON_FINITE[case]
    tiny["edit_manifest"](art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_bank_is_refused(art: Path, value: float) -> None:
    state = torch.load(art / "structural.pt", weights_only=True)
    state["bank"][3, 1] = value
    torch.save(state, art / "structural.pt")
    tiny["relist"](art, "structural.pt")
    with pytest.raises(ArtifactError, match="NaN or infinite values in 'bank'"):
        load_artifact(art)


def test_nan_threshold_is_not_written(built, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="threshold must be a finite"):
        tiny["save"](tmp_path / "art", *built, threshold=float("nan"))
    assert names_in(tmp_path) == []


def test_manifest_is_sealed_and_sorted(art: Path) -> None:
    data = (art / MANIFEST).read_bytes()
    manifest = json.loads(data)
    assert tiny["reseal"](data) == data  # the documented seal, recomputed independently
    assert list(manifest) == sorted(manifest)


def test_loading_builds_the_backbones_without_initialising_them(
    monkeypatch: pytest.MonkeyPatch, art: Path
) -> None:
    """Runtime.load does not pay for a random initialisation: the backbones are built on the
    meta device and every tensor is then filled from the artifact."""
    import engine.artifact_modules

    built_on: list[torch.device] = []
    original = engine.artifact_modules.load_backbone

    def spy(*args, **kwargs):
        extractor = original(*args, **kwargs)
        built_on.append(next(extractor.parameters()).device)
        return extractor

    monkeypatch.setattr(engine.artifact_modules, "load_backbone", spy)
    detector, _ = load_artifact(art, "cpu")
    assert built_on and all(device.type == "meta" for device in built_on)
    tensors = [*detector.logical.parameters(), *detector.structural_side.buffers()]
    assert not any(t.is_meta for t in tensors)


# ------------------------------------------------------------------ fusion.merge = "max"

IMAGE_STATS = {"logical": BranchStats(1.25, 0.5), "structural": BranchStats(2.0, 0.75)}


def with_merge(built, merge: str = "max"):
    """The tiny detector and config with ``fusion.merge=merge``, calibrated with IMAGE_STATS."""
    detector, config = built
    config = replace(config, fusion=replace(config.fusion, merge=merge))
    merged = Detector(
        detector.logical,
        detector.structural,
        config.fusion,
        detector.stats,
        structural_size=tiny["SIZE"],
        image_stats=IMAGE_STATS,
    )
    return merged, config


def test_max_merge_round_trip_keeps_the_image_statistics(built, tmp_path: Path) -> None:
    art = tiny["save"](tmp_path / "art", *with_merge(built))
    manifest = read_manifest(art)
    assert manifest["image_calibration"] == {b: asdict(s) for b, s in IMAGE_STATS.items()}
    detector, _ = load_artifact(art)
    assert detector.fusion.merge == "max" and detector.fusion.image_stats == IMAGE_STATS
    tiny["check_loads"](art)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (setting("image_calibration", value=DELETE), "image_calibration is missing"),
        (
            setting("image_calibration", "structural", value=DELETE),
            "image_calibration.structural is missing",
        ),
        (
            setting("image_calibration", "composition", value={"mean": 0.0, "std": 1.0}),
            "image_calibration must be an object with exactly the branches",
        ),
        (
            setting("image_calibration", "logical", "std", value=0),
            "image_calibration.logical.std must be a finite number in",
        ),
    ],
)
def test_max_merge_needs_valid_image_statistics(built, tmp_path: Path, edit, message) -> None:
    art = tiny["save"](tmp_path / "art", *with_merge(built))
    tiny["edit_manifest"](art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


def test_max_merge_is_not_calibrated_without_image_statistics(built) -> None:
    detector, config = built
    fusion = replace(config.fusion, merge="max")
    with pytest.raises(ValueError, match="needs the branches' image statistics"):
        Detector(detector.logical, detector.structural, fusion, detector.stats, structural_size=32)


def test_sum_merge_stores_no_image_statistics(built, tmp_path: Path) -> None:
    summed, config = with_merge(built, "sum")
    assert summed.fusion.image_stats == IMAGE_STATS
    art = tiny["save"](tmp_path / "art", summed, config)
    assert "image_calibration" not in read_manifest(art)


def test_a_composition_section_from_before_unseen_scale_reads_as_fitted_without_it(
    art: Path,
) -> None:
    manifest = json.loads((art / "manifest.json").read_bytes())
    assert parse_manifest(manifest, "art").config.composition.unseen_scale == 1.0
    del manifest["config"]["composition"]["unseen_scale"]
    assert parse_manifest(manifest, "art").config.composition.unseen_scale == 0.0
