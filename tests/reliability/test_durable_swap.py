"""The artifact writer's durable swap: every file fsynced, a failed or killed swap puts the old
artifact back, stale temporary folders of dead writers go, permissions follow the umask."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import artifact_files
from engine.artifact import MANIFEST, ArtifactError, ArtifactWriter, read_manifest


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_every_file_and_folder_is_fsynced(tiny, built, tmp_path: Path, monkeypatch) -> None:
    synced = set()
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    out = tiny["save"](tmp_path / "art", *built)
    for path in (out / "logical.pt", out / "structural.pt", out / MANIFEST, out, tmp_path):
        assert path.stat().st_ino in synced, path


def test_failed_second_rename_puts_the_old_artifact_back(
    tiny, built, art: Path, monkeypatch
) -> None:
    monkeypatch.setattr(artifact_files, "exchange", lambda a, b: False)  # two-rename fallback
    real_replace, calls = os.replace, []

    def failing(src, dst) -> None:
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    detector, config = built
    with pytest.raises(OSError, match="No space"):
        tiny["save"](art, detector, config, marker="B")
    monkeypatch.setattr(os, "replace", real_replace)
    assert read_manifest(art)["marker"] == "A"
    assert names_in(art.parent) == ["art"]


def test_fallback_swap_replaces_the_artifact(tiny, built, art: Path, monkeypatch) -> None:
    monkeypatch.setattr(artifact_files, "exchange", lambda a, b: False)
    tiny["save"](art, *built, marker="B")
    assert read_manifest(art)["marker"] == "B"
    assert names_in(art.parent) == ["art"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_folders_of_dead_writers_are_removed(tiny, built, art: Path) -> None:
    host, parent = artifact_files.HOST, art.parent
    dead = parent / f".art.tmp-{host}-{_dead_pid()}-abc"
    alive = parent / f".art.tmp-{host}-{os.getpid()}-def"
    remote = parent / f".art.tmp-otherhost-{_dead_pid()}-ghi"
    ancient = parent / ".art.old-otherhost-1-jkl"
    other = parent / f".photos.tmp-{host}-{_dead_pid()}-mno"
    for folder in (dead, alive, remote, ancient, other):
        folder.mkdir()
        (folder / "logical.pt").write_bytes(b"half")
    hours_ago = time.time() - artifact_files.STALE_AFTER_S - 60
    os.utime(ancient, (hours_ago, hours_ago))
    tiny["save"](art, *built, marker="B")
    left = names_in(parent)
    assert dead.name not in left and ancient.name not in left
    assert {alive.name, remote.name, other.name, "art"} == set(left)


def test_artifact_hidden_by_a_killed_swap_is_put_back(tiny, built, tmp_path: Path) -> None:
    hidden = tiny["save"](tmp_path / "elsewhere", *built)
    os.replace(hidden, tmp_path / f".art.old-{artifact_files.HOST}-{_dead_pid()}-abc")
    with pytest.raises(RuntimeError), ArtifactWriter(tmp_path / "art"):
        raise RuntimeError("the new build fails before committing")
    assert read_manifest(tmp_path / "art")["marker"] == "A"


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["022", "027"])
def test_artifact_permissions_follow_the_umask(tiny, built, tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        out = tiny["save"](tmp_path / "art", *built)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (out / "logical.pt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_failure_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), ArtifactWriter(tmp_path / "art") as w:
        w.file("logical.pt").write_bytes(b"half")
        raise KeyboardInterrupt
    assert names_in(tmp_path) == []


def test_failed_rebuild_keeps_previous_artifact(art: Path) -> None:
    with pytest.raises(RuntimeError), ArtifactWriter(art) as w:
        w.file("logical.pt").write_bytes(b"v2")
        raise RuntimeError("crash mid-build")
    assert read_manifest(art)["marker"] == "A"
    assert names_in(art.parent) == ["art"]


def test_rebuild_replaces_previous_artifact(tiny, built, art: Path) -> None:
    tiny["save"](art, *built, marker="B")
    assert read_manifest(art)["marker"] == "B"
    assert names_in(art.parent) == ["art"]


def test_writer_refuses_names_outside_the_staging_folder(tmp_path: Path) -> None:
    with (
        ArtifactWriter(tmp_path / "art") as w,
        pytest.raises(ArtifactError, match="plain relative"),
    ):
        w.file("../escape.pt")
