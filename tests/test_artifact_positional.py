"""An artifact with a positional memory: saved, loaded and run, and refused when malformed;
artifacts from before the branch existed still load."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.artifact import ArtifactError, load_artifact
from engine.calibrate import resize_to
from engine.runtime import Runtime

tiny = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    detector, config = tiny["tiny_detector"](0)
    return tiny["with_positional"](detector, config)


@pytest.fixture
def art(built, tmp_path: Path) -> Path:
    return tiny["save"](tmp_path / "art", *built)


def test_the_positional_map_is_the_memory_on_the_bank_features(built) -> None:
    detector = built[0]
    assert detector.branch_names == ("logical", "structural", "positional")
    batch = tiny["frames"]()
    maps = detector(batch)
    x = detector.structural_transform.batch(batch, channels_last=True)
    with torch.no_grad():
        cells = detector.positional(*detector.structural.patch_features(x))
    assert cells.shape == (2, 4, 4)
    want = resize_to(cells, (detector.map_size, detector.map_size), antialias=True)
    assert maps.positional is not None
    torch.testing.assert_close(maps.positional, want)
    torch.testing.assert_close(maps.fused, detector.fuse(maps.branches()))


def test_round_trip_gives_the_same_maps_and_the_runtime_returns_the_branch_map(
    built, art: Path
) -> None:
    detector, manifest = load_artifact(art)
    assert manifest["positional_memory"] == {"grid": [8, 8], "images": 5}
    assert set(manifest["files"]) == {"logical.pt", "structural.pt", "positional.pt"}
    assert manifest["config"]["positional"]["enabled"] is True
    batch = tiny["frames"]()
    want, got = built[0](batch), detector(batch)
    for name in ("positional", "fused"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))
    result = Runtime.load(art, device="cpu", backend="eager")(batch[0].numpy(), color="rgb")
    assert result.positional_map is not None and result.positional_map.shape == (32, 32)
    assert result.composition_map is None


def test_a_memory_capped_below_the_training_images_round_trips(tmp_path: Path) -> None:
    detector, config = tiny["tiny_detector"](0)
    capped = replace(tiny["TINY_POSITIONAL"], max_images=3)
    detector, config = tiny["with_positional"](detector, config, capped)
    path = tiny["save"](tmp_path / "capped", detector, config)
    loaded, manifest = load_artifact(path)
    assert manifest["positional_memory"] == {"grid": [8, 8], "images": 3}
    assert manifest["config"]["positional"]["max_images"] == 3
    batch = tiny["frames"]()
    torch.testing.assert_close(loaded(batch).positional, detector(batch).positional)


def test_an_artifact_from_before_the_positional_section_loads(tmp_path: Path) -> None:
    path = tiny["save"](tmp_path / "old", *tiny["tiny_detector"](0))
    tiny["edit_manifest"](path, lambda m: m["config"].pop("positional"))
    detector, manifest = load_artifact(path)
    assert detector.positional is None and "positional" not in manifest["config"]
    assert detector.branch_names == ("logical", "structural")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("positional_memory"), "positional_memory"),
        (lambda m: m["positional_memory"].update(grid=[8]), "positional_memory.grid"),
        (lambda m: m["positional_memory"].update(images=0), "positional_memory"),
        (lambda m: m["positional_memory"].update(images=4), "do not fit the model"),
        (lambda m: m["calibration"].pop("positional"), "calibration"),
    ],
)
def test_a_malformed_positional_memory_is_refused(art: Path, edit, message: str) -> None:
    tiny["edit_manifest"](art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


def test_a_missing_positional_file_is_refused(art: Path) -> None:
    (art / "positional.pt").unlink()
    with pytest.raises(ArtifactError, match=r"positional\.pt"):
        load_artifact(art)
