"""Filesystem primitives of :mod:`engine.artifact`.

Reading goes through one descriptor on the artifact folder and opens members relative to it
without following any symbolic link, so every file comes from the same folder (even if a
rebuild swaps the path meanwhile) and none can lie outside it. Writing fsyncs every file and
folder and swaps the new folder in atomically (Linux ``renameat2(RENAME_EXCHANGE)``, else two
renames with the old artifact put back if the second fails). Temp folders are named
``.<name>.tmp-<host>-<pid>-<random>`` so a later writer can tell a dead writer's leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from engine.artifact_manifest import ArtifactError

HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]
# A writer holds its temp folder only while exporting (seconds to minutes), so one this old
# belongs to a dead writer even when its PID has been reused since (or it ran on another host).
STALE_AFTER_S = 6 * 3600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temp_prefix(path: Path, kind: str) -> str:
    """Name prefix of this process's ``kind`` (``tmp`` or ``old``) folder beside ``path``."""
    return f".{path.name}.{kind}-{HOST}-{os.getpid()}-"


def staged_files(staging: Path) -> Iterator[str]:
    """Relative POSIX paths of the files in ``staging``; a link or special file is an error."""
    for p in staging.rglob("*"):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise ArtifactError(f"{p}: an artifact may hold only regular files and folders")
        if p.is_file():
            yield p.relative_to(staging).as_posix()


def staged_dirs(staging: Path) -> list[Path]:
    """``staging`` and every folder below it."""
    return [staging, *(p for p in staging.rglob("*") if p.is_dir())]


def hash_and_sync(path: Path) -> tuple[str, int]:
    """sha256 and size of the file at ``path``, flushed to disk."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(handle.fileno())  # fsync flushes the file's pages whichever fd wrote them
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where Linux allows (no race with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2``); False if unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def swap_into_place(staging: Path, path: Path) -> Path | None:
    """Put ``staging`` at ``path``; returns where the previous artifact went (None: no previous)."""
    if not os.path.lexists(path):
        os.replace(staging, path)
        return None
    if exchange(staging, path):
        return staging
    backup = path.with_name(temp_prefix(path, "old") + secrets.token_hex(4))
    os.replace(path, backup)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(backup, path)
        raise
    return backup


def clean_stale(path: Path) -> None:
    """Remove temp folders of dead writers of ``path``; put back an old artifact a writer killed
    mid-swap left hidden while nothing is at ``path`` (two-rename fallback only)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-([A-Za-z0-9]*)-(\d+)-[a-z0-9_]+")
    for entry in sorted(path.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if not found or not entry.is_dir() or entry.is_symlink():
            continue
        kind, host, pid = found[1], found[2], int(found[3])
        mine_and_dead = host == HOST and not pid_alive(pid)
        if not mine_and_dead and time.time() - entry.lstat().st_mtime < STALE_AFTER_S:
            continue
        if kind == "old" and not os.path.lexists(path):
            os.replace(entry, path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (zombies count as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replaced(root: Path, fd: int) -> bool:
    """Whether ``root`` no longer names the folder open as ``fd`` (a rebuild swapped it)."""
    try:
        now = os.stat(root)
    except OSError:
        return True
    then = os.fstat(fd)
    return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def explain_open_error(error: OSError) -> str:
    """Why a listed file could not be opened, for an error message."""
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return "listed in the manifest but missing"
    if error.errno == errno.ELOOP:
        return "is a symbolic link; an artifact holds only regular files"
    return f"cannot be read ({error.strerror})"


@contextlib.contextmanager
def opened_dir(path: Path) -> Iterator[int]:
    """A descriptor on the folder ``path``, closed on exit."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def open_member(root_fd: int, name: str) -> int:
    """A descriptor on the regular file ``name`` (a checked relative path) below ``root_fd``;
    no symbolic link is followed on the way, so the file cannot lie outside the folder."""
    *folders, leaf = name.split("/")
    fd = root_fd
    try:
        for folder in folders:
            parent, fd = fd, os.open(folder, _DIR_FLAGS, dir_fd=fd)
            if parent != root_fd:
                os.close(parent)
        # O_NONBLOCK: opening a FIFO planted in the folder must not hang.
        member = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(member).st_mode):
        os.close(member)
        raise OSError(errno.EINVAL, "not a regular file")
    return member


def entries(fd: int, prefix: str = "") -> Iterator[str]:
    """Relative paths of everything but folders below ``fd``, links not followed."""
    with os.scandir(fd) as scan:
        for entry in scan:
            if entry.is_dir(follow_symlinks=False):
                sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                try:
                    yield from entries(sub, f"{prefix}{entry.name}/")
                finally:
                    os.close(sub)
            else:
                yield prefix + entry.name
