"""Loading while another process rebuilds the artifact again and again: every load that
succeeds holds one build (its manifest and its weights), every other one is an ArtifactError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine import artifact_files
from engine.artifact import ArtifactError, load_artifact, read_manifest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _rebuild_loop(path: Path, sources: dict, faults, fallback: bool) -> None:
    if fallback:
        artifact_files.exchange = lambda a, b: False
    faults.write_forever(path, sources)


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_loads_during_rebuilds_never_mix_builds(
    tmp_path: Path, sources: dict, faults, tiny, swap: str
) -> None:
    path = tmp_path / "art"
    faults.write_copy(path, sources["B"])
    pid = faults.fork(lambda: _rebuild_loop(path, sources, faults, swap == "two renames"))
    loaded, manifests, refused = [], 0, []
    try:
        for _ in range(30):
            try:
                manifest = read_manifest(path)
            except ArtifactError as error:
                refused.append(str(error))
                continue
            assert manifest["files"] == sources[manifest["marker"]]["listing"]
            manifests += 1
        for _ in range(2):
            try:
                detector, manifest = load_artifact(path)
            except ArtifactError as error:
                refused.append(str(error))
                continue
            assert tiny["fingerprint"](detector) == sources[manifest["marker"]]["fingerprint"]
            assert manifest["threshold"] == sources[manifest["marker"]]["manifest"]["threshold"]
            loaded.append(manifest["marker"])
    finally:
        status = faults.kill(pid)
    assert not os.WIFEXITED(status), "the rebuild loop stopped early"
    assert loaded and manifests, refused
