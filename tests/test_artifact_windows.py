"""An artifact whose composition branch scores parts per place (``composition.windows``):
saved, loaded and run with the same maps, in eager and through the ONNX feature graphs."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from engine.artifact import load_artifact, read_manifest

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    return tiny["composed"](windows=(4, 2))


def test_round_trip_keeps_the_windows_and_their_calibration(built, tmp_path: Path) -> None:
    detector, config = built
    art = tiny["save"](tmp_path / "art", detector, config)
    assert read_manifest(art)["config"]["composition"]["windows"] == [4, 2]
    loaded, _ = load_artifact(art)
    assert loaded.composition is not None and loaded.composition.windows is not None
    torch.testing.assert_close(loaded.composition.group_scale, detector.composition.group_scale)
    with torch.no_grad():
        want, got = detector(tiny["frames"]()), loaded(tiny["frames"]())
        distances = loaded.structural_side.composition_distances(
            loaded.structural_transform.batch(tiny["frames"](), channels_last=True)
        )
    torch.testing.assert_close(got.composition, want.composition)
    torch.testing.assert_close(got.fused, want.fused)
    assert distances.shape == (2, 3)  # the descriptor and two window sizes
