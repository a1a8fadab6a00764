"""The build CLI end to end on a tiny synthetic category, and its handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import build
from engine.artifact import read_manifest
from engine.config import BuildConfig, cpu_build_preset
from engine.metrics import read_map

pytestmark = pytest.mark.slow


def test_build_writes_a_complete_artifact(tiny_build: dict[str, Path]) -> None:
    manifest = read_manifest(tiny_build["artifact"])
    assert manifest["category"] == "pushpins"
    assert set(manifest["files"]) == {"logical.pt", "structural.pt"}
    assert manifest["text_prior"] == {"kind": "learned", "prompt": "pushpins", "dim": None}
    assert manifest["backbones"]["logical"]["arch"] == "efficientnet_lite0"
    config = BuildConfig.from_dict(manifest["config"])
    assert config.logical.image_size == 64 and config.train.epochs == 1
    calibration = manifest["calibration"]
    assert calibration["logical"]["std"] > 0 and calibration["structural"]["std"] > 0
    scores = manifest["validation_scores"]
    assert len(scores) == 4 and manifest["threshold"] in scores
    for branch in ("logical", "structural", "fused"):
        auroc = manifest["metrics"][branch]["image_auroc"]["mean"]
        assert 0.0 <= auroc <= 1.0
    # Checkpoints are removed once the artifact exists; no temp folders are left behind.
    leftovers = [p.name for p in tiny_build["artifact"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not tiny_build["artifact"].with_name("artifact.checkpoints").exists()


def test_saved_maps_follow_the_official_layout(tiny_build: dict[str, Path]) -> None:
    maps = sorted((tiny_build["maps"] / "pushpins" / "test").rglob("*.tiff"))
    assert len(maps) == 9
    assert {p.parent.name for p in maps} == {"good", "logical_anomalies", "structural_anomalies"}
    assert read_map(maps[0]).shape == (100, 170)


def test_missing_data_root_fails_cleanly(tmp_path: Path, capsys) -> None:
    out = tmp_path / "art"
    code = build.main(["--category=pushpins", f"--data-root={tmp_path / 'nope'}", f"--out={out}"])
    assert code == build.EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_missing_category_fails_cleanly(tiny_loco: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "art"
    argv = ["--category=screws", f"--data-root={tiny_loco}", f"--out={out}", "--preset=cpu"]
    assert build.main(argv) == build.EXIT_BAD_INPUT
    assert "screws" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_synthetic_category_names_the_options(tmp_path: Path, capsys) -> None:
    argv = ["--category=widgets", f"--cache-dir={tmp_path}", "--preset=cpu"]
    assert build.main(argv) == build.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "widgets" in err and "pushpins" in err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_build_leaves_no_artifact(
    tiny_loco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_build_args: list[str]
) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("engine.pipeline.train_logical", interrupt)
    out = tmp_path / "art"
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={out}", *tiny_build_args]
    assert build.main(argv) == build.EXIT_INTERRUPTED
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_set_overrides_nested_fields() -> None:
    config = build.apply_overrides(
        cpu_build_preset(), ["logical.image_size=96", "train.lr=0.01", "text_prior=learned"]
    )
    assert config.logical.image_size == 96
    assert config.train.lr == 0.01
    assert config.text_prior == "learned"
    assert json.loads(json.dumps(config.to_dict()))["logical"]["image_size"] == 96


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("logical.nope=1", "no field 'nope'"),
        ("logical=1", "is a section"),
        ("weights.x=1", "not a section"),
        ("no_equals_sign", "SECTION.FIELD=VALUE"),
        ("logical.image_size=-3", "image_size must be positive"),
    ],
)
def test_bad_overrides_are_refused(assignment: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build.apply_overrides(cpu_build_preset(), [assignment])


def test_config_round_trips_through_a_manifest_dict() -> None:
    config = cpu_build_preset()
    assert BuildConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown BuildConfig fields"):
        BuildConfig.from_dict({"bogus": 1})
