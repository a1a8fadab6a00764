"""The kNN index in artifacts: approximate indexes saved and read back, exact ones rebuilt,
artifacts of the previous version (old index names) still loading, bad index records refused."""

from __future__ import annotations

import json
import logging
import runpy
from pathlib import Path

import pytest
import torch

from engine.artifact import ArtifactError, load_artifact, read_manifest
from engine.models import knn_index
from engine.models.knn_index import faiss_available

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not faiss_available(), reason="faiss is not installed"),
]

INDEX_FILES = {"index/bank.npy", "index/index.faiss", "index/index.json"}


def same_search(a, b, k: int = 3) -> None:
    queries = torch.randn(20, tiny["FEATURE_DIM"], generator=torch.Generator().manual_seed(1))
    for got, want in zip(a.search(queries, k), b.search(queries, k), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("spec", "params"), [("IVF2,PQ2x4", "nprobe=2"), ("HNSW32", ""), ("IVF4,Flat", "")]
)
def test_saved_index_round_trip(tmp_path: Path, spec: str, params: str) -> None:
    detector, config = tiny["tiny_detector"](3, index=spec, params=params)
    out = tiny["save"](tmp_path / "art", detector, config)
    manifest = read_manifest(out)
    assert set(manifest["files"]) >= INDEX_FILES
    assert manifest["structural_index"] == detector.structural.index.identity
    assert manifest["structural_index"]["exact"] is False
    loaded, _ = load_artifact(out)
    assert loaded.structural.index.identity == detector.structural.index.identity
    same_search(loaded.structural.index, detector.structural.index)


def test_exact_faiss_index_is_rebuilt_not_saved(tmp_path: Path) -> None:
    detector, config = tiny["tiny_detector"](3, index="Flat")
    out = tiny["save"](tmp_path / "art", detector, config)
    assert not INDEX_FILES & set(read_manifest(out)["files"])
    loaded, _ = load_artifact(out)
    assert loaded.structural.index.identity["spec"] == "Flat"
    same_search(loaded.structural.index, detector.structural.index)


def as_previous_version(path: Path, kind: str, identity: dict) -> None:
    """Rewrite a new artifact's index records as the previous version wrote them: the old kind
    name in the config (no index_params field) and the old identity, sealed again."""
    if (path / "index").is_dir():
        (path / "index" / "index.json").write_text(json.dumps(identity, indent=2, sort_keys=True))
        tiny["relist"](path, "index/index.json")

    def edit(manifest: dict) -> None:
        del manifest["config"]["structural"]["index_params"]
        manifest["config"]["structural"]["index"] = kind
        manifest["structural_index"] = identity

    tiny["edit_manifest"](path, edit)


SHAPE = {"size": 64, "dim": 8}
PREVIOUS = {
    "faiss_hnsw": (
        ("HNSW32", ""),
        {"kind": "faiss_hnsw", "m": 32, "ef_construction": 40, "ef_search": 128, **SHAPE},
    ),
    "faiss_ivfpq": (
        ("IVF2,PQ2x4", "nprobe=2"),
        {"kind": "faiss_ivfpq", "nlist": 2, "m": 2, "nbits": 4, "nprobe": 2, **SHAPE},
    ),
    "faiss_flat": (("Flat", ""), {"kind": "faiss_flat", **SHAPE}),
}


@pytest.mark.parametrize("kind", PREVIOUS)
def test_artifacts_of_the_previous_version_load(tmp_path: Path, kind: str, caplog) -> None:
    (spec, params), identity = PREVIOUS[kind]
    detector, config = tiny["tiny_detector"](3, index=spec, params=params)
    out = tiny["save"](tmp_path / "art", detector, config)
    as_previous_version(out, kind, identity)
    with caplog.at_level(logging.INFO, logger="engine.models.knn_compat"):
        loaded, manifest = load_artifact(out)
    assert manifest["structural_index"] == identity
    assert f"kNN index {kind!r} of an earlier version read as FAISS {spec!r}" in caplog.text
    assert loaded.structural.index.identity == detector.structural.index.identity
    same_search(loaded.structural.index, detector.structural.index)


def test_a_bank_larger_than_the_manifest_number_bound_round_trips(tmp_path: Path) -> None:
    # A LOCO-size category at the cpu preset's 384 px keeps 80 640 bank rows; the manifest's
    # bound on config numbers (65 536) once refused such an artifact at the end of its build.
    detector, config = tiny["tiny_detector"](3, index="Flat", bank_rows=80_640)
    out = tiny["save"](tmp_path / "art", detector, config)
    assert read_manifest(out)["structural_index"]["size"] == 80_640
    loaded, _ = load_artifact(out)
    assert loaded.structural.bank.shape == (80_640, tiny["FEATURE_DIM"])


def as_auto(manifest: dict) -> None:
    """The settings of a build that left the index to ``auto``."""
    manifest["config"]["structural"].update(index="auto", index_params="")


@pytest.mark.parametrize("version", ["current", "earlier"])
def test_the_index_auto_chose_loads_on_cpu(tmp_path: Path, monkeypatch, version: str) -> None:
    """A build with structural.index=auto records the approximate index it chose for a large
    bank (auto_index), this version's pick or an earlier version's; the artifact loads with
    that saved index on a CPU."""
    monkeypatch.setattr(knn_index, "AUTO_APPROXIMATE_ROWS", 64)
    current, earlier = knn_index.auto_faiss_specs(64, tiny["FEATURE_DIM"])
    assert (current, earlier) == ("IVF8,PQ4x4fs,RFlat", "IVF32,Flat")
    spec = current if version == "current" else earlier
    detector, config = tiny["tiny_detector"](3, index=spec)
    out = tiny["save"](tmp_path / "art", detector, config)
    tiny["edit_manifest"](out, as_auto)
    loaded, manifest = load_artifact(out)
    assert manifest["config"]["structural"]["index"] == "auto"
    assert loaded.structural.index.identity == detector.structural.index.identity
    same_search(loaded.structural.index, detector.structural.index)


@pytest.fixture
def hnsw_art(tmp_path: Path) -> Path:
    return tiny["save"](tmp_path / "art", *tiny["tiny_detector"](3, index="HNSW32"))


def setting(*keys: str, value: object):
    def edit(manifest: dict) -> None:
        for key in keys[:-1]:
            manifest = manifest[key]
        manifest[keys[-1]] = value

    return edit


BAD_RECORDS = {
    "params-misspelt": (setting("structural_index", "params", value="efSearch"), "params must"),
    "exact-string": (setting("structural_index", "exact", value="no"), "exact must be true"),
    "spec-number": (setting("structural_index", "spec", value=32), "spec must be a string"),
    "size-zero": (setting("structural_index", "size", value=0), "size must be positive"),
    "size-huge": (setting("structural_index", "size", value=1 << 31), "size must be an integer"),
    "config-auto": (
        setting("config", "structural", "index", value="auto"),
        "consistent with config.structural.index='auto' \\(on a CPU 'Flat' for 64 bank rows\\)",
    ),
    "config-other-spec": (
        setting("config", "structural", "index", value="HNSW16"),
        "consistent with config.structural.index='HNSW16'",
    ),
    "said-exact": (setting("structural_index", "exact", value=True), "files must list exactly"),
    "old-kind-without-its-fields": (
        setting("structural_index", value={"kind": "faiss_hnsw", **SHAPE}),
        r"structural_index.m is missing",
    ),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_index_records_are_artifact_errors(hnsw_art: Path, case: str) -> None:
    edit, message = BAD_RECORDS[case]
    tiny["edit_manifest"](hnsw_art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(hnsw_art)


def test_index_json_must_match_the_manifest(hnsw_art: Path) -> None:
    record = json.loads((hnsw_art / "index" / "index.json").read_text())
    (hnsw_art / "index" / "index.json").write_text(json.dumps({**record, "params": "efSearch=16"}))
    tiny["relist"](hnsw_art, "index/index.json")
    with pytest.raises(ArtifactError, match=r"index\.json differs"):
        load_artifact(hnsw_art)


def test_index_file_of_another_spec_is_refused(hnsw_art: Path, tmp_path: Path) -> None:
    other = tiny["save"](tmp_path / "ivf", *tiny["tiny_detector"](3, index="IVF4,Flat"))
    (hnsw_art / "index" / "index.faiss").write_bytes((other / "index" / "index.faiss").read_bytes())
    tiny["relist"](hnsw_art, "index/index.faiss")
    with pytest.raises(ArtifactError, match=r"index\.faiss: index\.faiss is not a IndexHNSWFlat"):
        load_artifact(hnsw_art)
