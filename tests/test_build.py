"""The build CLI end to end on a tiny synthetic category, and its handling of bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import build
from engine.artifact import read_manifest
from engine.config import BuildConfig, cpu_build_preset
from engine.metrics import read_map
from engine.runtime import Runtime

GOOD, ANOMALY_KINDS = "good", ("logical_anomalies", "structural_anomalies")

pytestmark = pytest.mark.slow


def test_build_writes_a_complete_artifact(tiny_build: dict[str, Path]) -> None:
    manifest = read_manifest(tiny_build["artifact"])
    assert manifest["category"] == "pushpins"
    assert manifest["data"] == {
        "format": "loco",
        "evaluation": "loco",
        "images": {"train": 8, "validation": 4},
        "test_images": {"good": 3, "anomalous": 6},
    }
    assert set(manifest["files"]) == {
        "logical.pt",
        "structural.pt",
        "composition.pt",
        "positional.pt",
    }
    assert manifest["text_prior"] == {"kind": "learned", "prompt": "pushpins", "dim": None}
    assert manifest["backbones"]["logical"]["arch"] == "efficientnet_lite0"
    config = BuildConfig.from_dict(manifest["config"])
    assert config.logical.image_size == 64 and config.train.epochs == 1
    calibration = manifest["calibration"]
    assert calibration["logical"]["std"] > 0 and calibration["structural"]["std"] > 0
    scores = manifest["validation_scores"]
    assert len(scores) == 4 and manifest["threshold"] in scores
    # Checkpoints are removed once the artifact exists; no temp folders are left behind.
    leftovers = [p.name for p in tiny_build["artifact"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not tiny_build["artifact"].with_name("artifact.checkpoints").exists()


def rank_auroc(negatives: list[float], positives: list[float]) -> float:
    """P(positive > negative) + P(tie) / 2, counted over every (negative, positive) pair."""
    neg = np.asarray(negatives, dtype=np.float64)[:, None]
    pos = np.asarray(positives, dtype=np.float64)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (neg.size * pos.size))


def assert_aurocs_match(scores: dict[str, list[float]], stored: dict) -> None:
    """The manifest's image AUROCs of one branch equal the rank AUROCs of ``scores``
    (image scores keyed by defect type) to 1e-9."""
    every = np.concatenate([scores[kind] for kind in (GOOD, *ANOMALY_KINDS)])
    # Without ties the official evaluator's AUROC (tie quirk included) is the rank AUROC too.
    assert np.unique(every).size == every.size, "tied image scores: official AUROC differs"
    expected = {kind: rank_auroc(scores[GOOD], scores[kind]) for kind in ANOMALY_KINDS}
    expected["mean"] = sum(expected.values()) / 2
    for key, value in expected.items():
        assert stored["image_auroc"][key] == pytest.approx(value, abs=1e-9), key
        assert stored["image_auroc_tie_correct"][key] == pytest.approx(value, abs=1e-9), key


def test_fused_auroc_recomputed_from_the_saved_maps(tiny_build: dict[str, Path]) -> None:
    test_maps = tiny_build["maps"] / "pushpins" / "test"
    scores = {
        kind: [float(read_map(p).max()) for p in sorted((test_maps / kind).glob("*.tiff"))]
        for kind in (GOOD, *ANOMALY_KINDS)
    }
    assert [len(s) for s in scores.values()] == [3, 3, 3]
    assert_aurocs_match(scores, read_manifest(tiny_build["artifact"])["metrics"]["fused"])


def test_branch_aurocs_recomputed_from_runtime_branch_maps(
    tiny_build: dict[str, Path], fused_reference: Callable
) -> None:
    """Branch-only maps as the build defines them (pipeline.branch_only): that branch alone,
    normalised with its stored statistics and blurred like the fused map, at image size."""
    rt = Runtime.load(tiny_build["artifact"], device="cpu")
    # a branch alone is standardised and blurred whatever the merge: the sum of one map
    fusion = {**rt.manifest["config"]["fusion"], "merge": "sum"}
    manifest = {**rt.manifest, "config": {**rt.manifest["config"], "fusion": fusion}}
    test_images = tiny_build["data"] / "pushpins" / "test"
    results, sizes = {}, {}
    for kind in (GOOD, *ANOMALY_KINDS):
        paths = sorted(test_images.glob(f"{kind}/*.png"))
        images = [np.array(Image.open(p).convert("RGB")) for p in paths]
        results[kind], sizes[kind] = rt(images, color="rgb"), images[0].shape[:2]
    for branch in manifest["calibration"]:
        scores = {
            kind: [
                float(fused_reference(r, manifest, sizes[kind], {branch: 1.0}).max())
                for r in results[kind]
            ]
            for kind in results
        }
        assert_aurocs_match(scores, manifest["metrics"][branch])


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


def test_print_config_prints_the_resolved_settings(capsys) -> None:
    argv = ["--print-config", "--preset=cpu", "--epochs=3", "--set=logical.image_size=96"]
    assert build.main([*argv, "--target-far=0.01"]) == 0
    printed = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    config = BuildConfig.from_dict(printed)
    assert config.preset == "cpu" and config.logical.image_size == 96
    assert config.train.epochs == 3 and config.train.steps is None
    assert config.fusion.target_false_alarm_rate == 0.01
    assert build.main([*argv, "--target-far=1.5"]) == build.EXIT_BAD_INPUT


def test_config_file_then_options_then_set(tmp_path: Path, capsys) -> None:
    """A partial file keeps the preset's other values; --set still wins over the file."""
    path = tmp_path / "line3.json"
    path.write_text(json.dumps({"logical": {"image_size": 64}, "train": {"lr": 0.002}}))
    argv = ["--print-config", "--preset=cpu", f"--config={path}", "--set=train.lr=0.003"]
    assert build.main(argv) == 0
    config = BuildConfig.from_dict(json.loads(capsys.readouterr().out))
    preset = cpu_build_preset()
    assert config.logical.image_size == 64 and config.train.lr == 0.003
    assert (
        config.structural == preset.structural and config.logical.backbone == "efficientnet_lite0"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON file"),
        ("[1, 2]", "expected a JSON object"),
        ('{"logical": {"nope": 1}}', "unknown LogicalConfig fields"),
        ('{"logical": {"image_size": "big"}}', "logical.image_size"),
    ],
)
def test_bad_config_files_are_refused(tmp_path: Path, capsys, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert build.main(["--print-config", f"--config={path}"]) == build.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_category_is_required_to_build(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build.main([])
    assert exit_info.value.code == 2 and "--category" in capsys.readouterr().err
