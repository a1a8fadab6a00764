"""engine.atomic: a file is replaced whole or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from engine.atomic import atomic_file


def test_content_replaces_the_file_and_nothing_is_left_behind(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.txt"
    with atomic_file(path, text=True) as file:
        file.write("new")
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.txt"]


def test_an_error_inside_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_file(path) as file:
        file.write(b"half")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_mode_is_kept_or_follows_the_umask(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.write_text("x")
    kept.chmod(0o640)
    with atomic_file(kept) as file:
        file.write(b"y")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    previous = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "fresh") as file:
            file.write(b"z")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o644
