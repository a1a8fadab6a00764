"""An artifact whose composition branch has fine parts: saved, loaded and run with the same
maps; its backbone must reach the levels the fine parts read."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from engine.artifact import load_artifact, read_manifest
from engine.models.structural import StructuralModel

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    return tiny["composed"](levels=("layer1", "layer2"), fine_parts=True)


def test_round_trip_keeps_the_fine_parts_and_their_calibration(built, tmp_path: Path) -> None:
    detector, config = built
    art = tiny["save"](tmp_path / "art", detector, config)
    assert read_manifest(art)["config"]["composition"]["fine_parts"] is True
    loaded, _ = load_artifact(art)
    assert loaded.composition is not None and loaded.composition.fine is not None
    torch.testing.assert_close(loaded.composition.group_scale, detector.composition.group_scale)
    with torch.no_grad():
        want, got = detector(tiny["frames"]()), loaded(tiny["frames"]())
    torch.testing.assert_close(got.composition, want.composition)
    torch.testing.assert_close(got.fused, want.fused)


def test_structural_side_scores_the_fine_levels_of_the_bank_pass(built) -> None:
    detector, _ = built
    x = detector.structural_transform.batch(tiny["frames"](), channels_last=True)
    features = detector.structural.patch_features
    with torch.no_grad():
        patch, grid, fine = features.with_fine(x)
        want, *_ = detector.composition(patch, grid, fine)
        side = detector.structural_side(x)
        distances = detector.structural_side.composition_distances(x)
    torch.testing.assert_close(side["composition"], want[:, None, None].expand(-1, 32, 32))
    assert distances.shape == (2, 2)
    assert tuple(fine[0].shape[-2:]) == (8, 8) and tuple(fine[1].shape[-2:]) == (4, 4)


def test_fine_parts_refuse_a_backbone_that_stops_before_layer2() -> None:
    config = tiny["tiny_config"]()  # levels ("layer1",)
    structural = StructuralModel.from_config(config.structural, "random", True, verbose=False)
    with pytest.raises(ValueError, match=r"fine_parts reads .*'layer2'.* build only \('layer1',\)"):
        structural.patch_features.fine_channels()
