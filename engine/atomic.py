"""Replacing a file in one step: a crash or Ctrl-C leaves the old file or the new one, never a
half-written one."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_file"]


@contextmanager
def atomic_file(path: str | Path, text: bool = False) -> Iterator[IO]:
    """A file handle whose content replaces ``path`` when the block ends without error.

    The content goes to a hidden temporary file in ``path``'s folder (created if missing),
    is flushed and fsynced, then renamed over ``path``; on any error, Ctrl-C included, the
    temporary file is removed and ``path`` is left as it was. The new file keeps the mode of
    the file it replaces, or gets the umask's default (a temporary file is private otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~umask
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, mode)
        with os.fdopen(
            handle, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})
        ) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
