"""An artifact whose memory bank weighs distances by its local density (structural.density_k):
the row scales travel in the state dict and the loaded detector gives the same maps."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.artifact import load_artifact, read_manifest
from engine.manifest_fields import ArtifactError

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = pytest.mark.usefixtures("one_thread")


def _weighted(k: int = 3):
    """The tiny detector with density weights, its config, an input and its scores before."""
    detector, config = tiny["tiny_detector"]()
    structural = detector.structural
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = structural.score_features(*structural.patch_features(x))
    structural.density_k = k
    structural.set_bank(structural.bank)  # computes the row scales
    assert structural.row_scale.shape == (structural.bank.shape[0],)
    config = replace(config, structural=replace(config.structural, density_k=k))
    return detector, config, x, plain


def test_round_trip_keeps_the_row_scales_and_the_maps(tmp_path: Path) -> None:
    detector, config, _, _ = _weighted()
    art = tiny["save"](tmp_path / "art", detector, config)
    assert read_manifest(art)["config"]["structural"]["density_k"] == 3
    loaded, _ = load_artifact(art)
    torch.testing.assert_close(loaded.structural.row_scale, detector.structural.row_scale)
    with torch.no_grad():
        want, got = detector(tiny["frames"]()), loaded(tiny["frames"]())
    torch.testing.assert_close(got.structural, want.structural)
    torch.testing.assert_close(got.fused, want.fused)


def test_the_weights_change_the_structural_scores() -> None:
    detector, _, x, plain = _weighted()
    structural = detector.structural
    with torch.no_grad():  # the same input as the plain scores
        weighted = structural.score_features(*structural.patch_features(x))
    assert weighted.shape == plain.shape
    assert not torch.allclose(weighted, plain)


def test_a_manifest_asking_for_weights_the_state_lacks_is_refused(tmp_path: Path) -> None:
    detector, config, _, _ = _weighted()
    config = replace(config, structural=replace(config.structural, density_k=0))
    detector.structural.density_k = 0
    detector.structural.row_scale = torch.empty(0)
    art = tiny["save"](tmp_path / "art", detector, config)
    tiny["edit_manifest"](art, lambda m: m["config"]["structural"].update(density_k=3))
    with pytest.raises(ArtifactError, match="row_scale"):
        load_artifact(art)
