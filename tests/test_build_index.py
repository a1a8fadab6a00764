"""structural.index=auto in a build: a bank from AUTO_APPROXIMATE_ROWS rows on gets inverted lists
of product codes on a CPU, recorded in the manifest and saved with the artifact; the Runtime
searches it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.artifact import load_artifact, read_manifest
from engine.build import main
from engine.models import knn_index
from engine.runtime import Runtime

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not knn_index.faiss_available(), reason="faiss is not installed"),
]


def test_auto_builds_an_approximate_index_for_a_large_bank(
    tiny_loco: Path, tmp_path: Path, tiny_build_args: list[str], monkeypatch, capsys
) -> None:
    monkeypatch.setattr(knn_index, "AUTO_APPROXIMATE_ROWS", 16)  # the tiny bank counts as large
    out = tmp_path / "art"
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={out}", *tiny_build_args]
    assert main(argv) == 0
    manifest = read_manifest(out)
    identity = manifest["structural_index"]
    assert manifest["config"]["structural"]["index"] == "auto"
    assert identity["spec"] == knn_index.auto_faiss_spec(identity["size"], identity["dim"])
    assert identity["spec"].startswith("IVF") and identity["exact"] is False
    # the engine's defaults, with auto's own probe count for its approximate pick
    assert identity["params"] == f"{knn_index.AUTO_APPROXIMATE_PARAMS},k_factor_rf=16"
    assert f"search: {identity['spec']}" in capsys.readouterr().out

    detector, _ = load_artifact(out)
    assert detector.structural.index.identity == identity
    frame = np.asarray(np.random.default_rng(0).integers(0, 256, (100, 170, 3)), np.uint8)
    assert np.isfinite(Runtime.load(out, device="cpu")(frame).score)
