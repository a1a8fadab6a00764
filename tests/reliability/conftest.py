"""Shared builds for the fault-injection suite: two tiny artifacts A and B (other weights,
other bank, other threshold) kept in memory as the files and manifest a writer needs."""

from __future__ import annotations

import contextlib
import copy
import os
import runpy
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine.artifact import ArtifactWriter, read_manifest

TINY = runpy.run_path(str(Path(__file__).with_name("tiny.py")))
# Keys a writer adds itself; the rest is what save_artifact hands to ArtifactWriter.commit.
WRITER_KEYS = {"format_version", "files", "manifest_sha256", "created_unix", "package_versions"}


@pytest.fixture(scope="session")
def tiny() -> dict[str, Any]:
    return TINY


@pytest.fixture(autouse=True)
def _tiny_tensors(one_thread: None) -> None:
    """Every test here works on tiny tensors (see ``one_thread``)."""


@pytest.fixture(scope="session")
def built() -> tuple:
    """A tiny calibrated detector and its config (build "A")."""
    torch.set_num_threads(1)
    return TINY["tiny_detector"](0)


@pytest.fixture
def art(built: tuple, tmp_path: Path) -> Path:
    """A fresh tiny artifact of build "A" at ``tmp_path / "art"``."""
    return TINY["save"](tmp_path / "art", *built)


@pytest.fixture(scope="session")
def sources(built: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Builds "A" and "B": their files' bytes, manifest, listing and weights' fingerprint."""
    detector, config = copy.deepcopy(built[0]), built[1]  # B is A modified in place
    out = {}
    for marker, threshold in (("A", 1.5), ("B", 2.5)):
        if marker == "B":
            detector = TINY["rebuilt"](detector, seed=1)
        path = TINY["save"](
            tmp_path_factory.mktemp(marker) / "art",
            detector,
            config,
            threshold=threshold,
            marker=marker,
        )
        manifest = read_manifest(path)
        out[marker] = {
            "files": {name: (path / name).read_bytes() for name in manifest["files"]},
            "manifest": {k: v for k, v in manifest.items() if k not in WRITER_KEYS},
            "listing": manifest["files"],
            "fingerprint": TINY["fingerprint"](detector),
        }
    return out


def write_copy(path: Path, source: dict[str, Any]) -> None:
    """Write the build ``source`` at ``path`` through the public ArtifactWriter."""
    with ArtifactWriter(path) as writer:
        for name, data in source["files"].items():
            writer.file(name).write_bytes(data)
        writer.commit(source["manifest"])


def fork(target: Callable[[], None]) -> int:
    """Run ``target`` in a forked child (exit 0, or 1 if it raises); returns its PID."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            target()
            code = 0
        finally:
            os._exit(code)
    return pid


def kill(pid: int) -> int:
    """SIGKILL the child ``pid`` (if still running) and reap it; returns its wait status."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def write_forever(path: Path, sources: dict[str, Any], seconds: float = 60.0) -> None:
    """Rewrite ``path`` with A, B, A, ... (a rebuild loop) for at most ``seconds``."""
    deadline, turn = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        write_copy(path, sources["AB"[turn % 2]])
        turn += 1


def assert_one_complete_build(path: Path, sources: dict[str, Any]) -> str:
    """``path`` holds exactly build A or build B, checksums verified; returns which."""
    manifest = read_manifest(path)
    marker = manifest["marker"]
    assert manifest["files"] == sources[marker]["listing"]
    visible = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
    assert visible == [path.name]
    return marker


@pytest.fixture(scope="session")
def faults() -> SimpleNamespace:
    """The helpers above, for the test modules (tests are not an importable package)."""
    return SimpleNamespace(
        write_copy=write_copy,
        fork=fork,
        kill=kill,
        write_forever=write_forever,
        assert_one_complete_build=assert_one_complete_build,
    )
