"""Writing an artifact: what a build may replace, and the atomic, durable swap into place.

The folder is assembled in a hidden sibling ``.<name>.tmp-<host>-<pid>-*`` folder, every file
and folder is fsynced, then it is swapped into place in one atomic ``renameat2(RENAME_EXCHANGE)``
(Linux; elsewhere two renames, the old artifact put back if the second fails). Only an empty
folder or an engine artifact is ever replaced (:func:`check_target`). Temp folders of writers
that died are removed by the next write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import engine
from engine import artifact_files as fs
from engine.artifact_manifest import (
    FORMAT_VERSION,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    ArtifactError,
    check_member_name,
    encode_manifest,
    parse_json,
    some_names,
)

__all__ = ["ArtifactWriter", "check_target", "package_versions"]


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the artifact depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"engine": engine.__version__}
    for name in ("torch", "torchvision", "numpy", "faiss-cpu", "triton", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


# --------------------------------------------------------------------------- what may be replaced


def check_target(path: str | Path) -> None:
    """Raise :class:`ArtifactError` unless a build may write its artifact at ``path``.

    Allowed: nothing there, an empty folder, or an engine artifact (a manifest of this engine's
    format and nothing but the files it lists). Anything else (a file, a link, a folder of the
    user's files or of other artifacts) would be destroyed by the swap and is refused.
    """
    target = Path(path)
    advice = "choose another --out or remove it yourself"
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ArtifactError(
            f"{target}: cannot be inspected ({error.strerror}); {advice}"
        ) from error
    if stat.S_ISLNK(info.st_mode):
        raise ArtifactError(f"{target} is a symbolic link, not an engine artifact; {advice}")
    if not stat.S_ISDIR(info.st_mode):
        raise ArtifactError(f"{target} is a file, not an engine artifact folder; {advice}")
    try:
        with fs.opened_dir(target) as fd:
            entries = sorted(fs.entries(fd))
            listed = _listed_files(fd) if MANIFEST in entries else None
    except OSError as error:
        raise ArtifactError(
            f"{target}: cannot be inspected ({error.strerror}); {advice}"
        ) from error
    if not entries:
        return
    if listed is None:
        raise ArtifactError(
            f"{target} is not empty and not an engine artifact (no readable {MANIFEST} of "
            f"format version {FORMAT_VERSION}); it holds {some_names(entries)}; {advice}"
        )
    foreign = [e for e in entries if e != MANIFEST and e not in listed]
    if foreign:
        raise ArtifactError(
            f"{target} holds files that are not part of its artifact: {some_names(foreign)}; {advice}"
        )


def _listed_files(fd: int) -> set[str] | None:
    """The files an engine manifest in ``fd`` lists, or None when it is not one of ours.

    Older formats of this engine count as ours (a rebuild after an upgrade replaces them);
    the seal is not checked: a damaged artifact of ours may be replaced too.
    """
    try:
        with os.fdopen(fs.open_member(fd, MANIFEST), "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES)
        manifest = parse_json(data, MANIFEST)
    except (ArtifactError, OSError):
        return None
    if not isinstance(manifest, dict):
        return None
    version, files = manifest.get("format_version"), manifest.get("files")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        return None
    return set(files) if isinstance(files, dict) else None


# --------------------------------------------------------------------------------------- writing


class ArtifactWriter:
    """Build an artifact in a temp folder; :meth:`commit` makes it appear atomically.

    Use as a context manager: leaving the block without :meth:`commit` (an exception, Ctrl-C)
    deletes the temp folder and leaves any existing artifact at ``path`` untouched. Raises
    :class:`ArtifactError` when ``path`` holds something that is not an artifact.
    """

    def __init__(self, path: str | Path):
        given = Path(path)
        if given.name in ("", ".", ".."):
            raise ArtifactError(f"{path!r}: an artifact path must end in a folder name")
        self.path = given.parent.resolve() / given.name
        check_target(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fs.clean_stale(self.path)
            prefix = fs.temp_prefix(self.path, "tmp")
            self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.path.parent))
            # mkdtemp creates 0700; the artifact must be as readable as any folder made here.
            os.chmod(self.staging, 0o777 & ~fs.umask())
        except OSError as error:
            raise ArtifactError(
                f"{self.path}: cannot prepare the artifact folder ({error})"
            ) from error
        self._committed = False

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def file(self, name: str) -> Path:
        """Path inside the staging folder for a file the caller writes itself."""
        target = self.staging / check_member_name(name, str(self.staging))
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Checksum and fsync every staged file, write the sealed manifest last, swap it in."""
        files = {}
        for rel in sorted(fs.staged_files(self.staging)):
            digest, size = fs.hash_and_sync(self.staging / rel)
            files[rel] = {"sha256": digest, "bytes": size}
        full = {
            "created_unix": time.time(),
            "package_versions": package_versions(),
            **manifest,
            "format_version": FORMAT_VERSION,
            "files": files,
        }
        with open(self.staging / MANIFEST, "wb") as handle:
            handle.write(encode_manifest(full))
            handle.flush()
            os.fsync(handle.fileno())
        for folder in sorted(fs.staged_dirs(self.staging), key=lambda p: -len(p.parts)):
            fs.fsync_dir(folder)
        check_target(self.path)  # again: something may have appeared there since __init__
        previous = fs.swap_into_place(self.staging, self.path)
        self._committed = True
        fs.fsync_dir(self.path.parent)
        if previous is not None and previous.is_dir() and not previous.is_symlink():
            shutil.rmtree(previous, ignore_errors=True)
        return self.path
