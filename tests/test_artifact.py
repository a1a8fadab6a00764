import json

import pytest

from engine.artifact import FORMAT_VERSION, MANIFEST, ArtifactError, ArtifactWriter, read_manifest


def _build(path, payload=b"weights", extra=None):
    with ArtifactWriter(path) as w:
        w.file("logical.pt").write_bytes(payload)
        w.file("engines/model.onnx").write_bytes(b"onnx")
        return w.commit({"category": "pushpins", **(extra or {})})


def test_commit_writes_manifest_with_checksums(tmp_path):
    out = _build(tmp_path / "art")
    manifest = read_manifest(out)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["category"] == "pushpins"
    assert set(manifest["files"]) == {"logical.pt", "engines/model.onnx"}
    assert manifest["files"]["logical.pt"]["bytes"] == len(b"weights")
    assert "torch" in manifest["package_versions"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), ArtifactWriter(tmp_path / "art") as w:
        w.file("logical.pt").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_previous_artifact(tmp_path):
    out = _build(tmp_path / "art", payload=b"v1")
    with pytest.raises(RuntimeError), ArtifactWriter(out) as w:
        w.file("logical.pt").write_bytes(b"v2")
        raise RuntimeError("crash mid-build")
    assert (out / "logical.pt").read_bytes() == b"v1"
    read_manifest(out)


def test_rebuild_replaces_previous_artifact(tmp_path):
    out = _build(tmp_path / "art", payload=b"v1")
    _build(out, payload=b"v2")
    assert (out / "logical.pt").read_bytes() == b"v2"
    assert read_manifest(out)["files"]["logical.pt"]["bytes"] == 2


def test_tampered_file_is_refused(tmp_path):
    out = _build(tmp_path / "art")
    (out / "logical.pt").write_bytes(b"weightz")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_manifest(out)


def test_missing_file_is_refused(tmp_path):
    out = _build(tmp_path / "art")
    (out / "engines" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_manifest(out)


def test_missing_manifest_means_incomplete(tmp_path):
    (tmp_path / "art").mkdir()
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        read_manifest(tmp_path / "art")


def test_other_format_version_is_refused(tmp_path):
    out = _build(tmp_path / "art")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version"):
        read_manifest(out)


def test_not_a_folder(tmp_path):
    with pytest.raises(ArtifactError, match="no artifact folder"):
        read_manifest(tmp_path / "nope")


def test_garbage_manifest(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        read_manifest(tmp_path / "art")
