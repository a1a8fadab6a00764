"""tools.accuracy: mean ± std tables, the marker-kept document, options, a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.artifact import read_manifest
from engine.calibrate import MERGES
from engine.config import cpu_build_preset
from engine.data.types import DefectSpec, GroundTruthChannel
from engine.metrics.per_defect import defect_name
from tools import accuracy
from tools.accuracy_report import (
    NEW_DOCUMENT,
    SPRO_PER_DEFECT,
    category_table,
    cell,
    collapse_table,
    defect_table,
    render_block,
    update_document,
    write_atomic,
)


def record(category: str, seed: int, means: dict[str, float], per_defect=None) -> dict:
    """A hand-made build record: ``means`` gives each branch's mean-subset image AUROC."""
    metrics = {
        branch: {
            "image_auroc_tie_correct": {"mean": value},
            "au_spro_0.05": {"mean": None},
            "image_auroc_per_defect": (per_defect or {}).get(branch, {}),
        }
        for branch, value in means.items()
    }
    return {
        "category": category,
        "seed": seed,
        "seconds": 100.0 + 30 * seed,
        "metrics": metrics,
        "defect_kinds": {"extra": "logical", "scratch": "structural"},
        "test_defects": ["good", "extra", "extra", "scratch"],
    }


RECORDS = [
    record("a", 0, {"logical": 0.6, "fused": 0.8, "composition": 0.5}),
    record("a", 1, {"logical": 0.7, "fused": 0.9, "composition": 0.7}),
    record("b", 0, {"logical": 0.8, "fused": 1.0}),
    record("b", 1, {"logical": 0.9, "fused": 0.7}),
]


def test_cell_is_mean_and_sample_std_over_seeds() -> None:
    assert cell([0.9, 0.8, 0.7]) == "0.800 ± 0.100"
    assert cell([0.91234]) == "0.912"
    assert cell([0.9, None]) == "–"
    assert cell([]) == "–"
    assert cell([100.0, 130.0], digits=0) == "115 ± 21"


def test_category_table_rows_categories_and_overall_columns_branches() -> None:
    assert category_table(RECORDS, "image_auroc_tie_correct", "mean") == (
        "| category | logical | fused | composition |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| a | 0.650 ± 0.071 | 0.850 ± 0.071 | 0.600 ± 0.141 |\n"
        "| b | 0.850 ± 0.071 | 0.850 ± 0.212 | – |\n"
        # overall: per seed the mean over a and b (0.7, 0.8 logical; 0.9, 0.8 fused)
        "| **overall** | 0.750 ± 0.071 | 0.850 ± 0.071 | – |\n"
    )
    # a value the data cannot define (None) is shown as missing, never averaged away
    assert category_table(RECORDS, "au_spro_0.05", "mean").count("–") == 9


def test_defect_table_per_type_with_kind_and_count() -> None:
    per_defect = [
        {"fused": {"extra": 0.5, "scratch": 1.0}},
        {"fused": {"extra": 0.7, "scratch": 0.9}},
    ]
    records = [record("a", s, {"fused": 0.0}, per_defect[s]) for s in (0, 1)]
    assert defect_table(records) == (
        "| category | defect type | kind | n | fused |\n"
        "| --- | --- | --- | ---: | ---: |\n"
        "| a | extra | logical | 2 | 0.600 ± 0.141 |\n"
        "| a | scratch | structural | 1 | 0.950 ± 0.071 |\n"
    )


def test_defect_table_of_au_spro_reads_each_type_under_its_subset() -> None:
    records = [record("a", s, {"fused": 0.0}) for s in (0, 1)]
    for build, (extra, scratch) in zip(records, [(0.2, 0.8), (0.4, None)]):
        build["metrics"]["fused"][SPRO_PER_DEFECT] = {
            "logical_anomalies": {"extra": extra},
            "structural_anomalies": {} if scratch is None else {"scratch": scratch},
        }
    assert defect_table(records, SPRO_PER_DEFECT) == (
        "| category | defect type | kind | n | fused |\n"
        "| --- | --- | --- | ---: | ---: |\n"
        "| a | extra | logical | 2 | 0.300 ± 0.141 |\n"
        "| a | scratch | structural | 1 | – |\n"
    )


META = {
    "machine": "CPU X, 2 logical cores (2 usable)",
    "torch_threads": 2,
    "date": "2025-01-02 03:04 UTC",
    "commit": "abc (dirty)",
    "command": "python -m tools.accuracy",
    "wall_seconds": 600.0,
    "preset": "cpu",
    "device": "cpu",
    "overrides": ["train.epochs=2"],
    "seeds": [0, 1],
    "counts": accuracy.dataset_counts(60, 16, 100),
    "generator_version": 2,
}


def test_render_block_has_run_facts_and_every_metric_group() -> None:
    block = render_block(RECORDS, META, None)
    assert block.startswith("## Results\n")
    for fact in ("CPU X", "2025-01-02", "abc (dirty)", "`python -m tools.accuracy`", "600 s"):
        assert fact in block
    assert "`--set train.epochs=2`" in block and "100 logical" in block
    for title in ("Image AUROC", "AU-sPRO@0.05"):
        for subset in ("logical", "structural", "mean"):
            assert f"### {title}, {subset} subset\n" in block
    assert "### Image AUROC per defect type" in block and "### Build time" in block
    assert render_block(RECORDS, META, "mff").startswith("### Ablation `mff`\n")


def test_update_document_replaces_only_between_its_markers() -> None:
    first = update_document(None, "main 1\n", None)
    assert first == NEW_DOCUMENT.replace(
        "<!-- accuracy:begin -->\n", "<!-- accuracy:begin -->\nmain 1\n"
    )
    edited = first + "\nHand-written ablation notes.\n"
    tagged = update_document(edited, "mff 1\n", "mff")
    assert tagged.startswith(edited)
    assert tagged.endswith("\n<!-- accuracy:mff:begin -->\nmff 1\n<!-- accuracy:mff:end -->\n")
    again = update_document(update_document(tagged, "main 2\n", None), "mff 2\n", "mff")
    assert again == tagged.replace("main 1", "main 2").replace("mff 1", "mff 2")


def test_update_document_places_missing_blocks() -> None:
    text = "# Notes\n\n## Ablations\n\nkept\n"
    assert update_document(text, "m\n", None) == (
        "# Notes\n\n<!-- accuracy:begin -->\nm\n<!-- accuracy:end -->\n\n## Ablations\n\nkept\n"
    )
    assert update_document("# Notes", "t\n", "x") == (
        "# Notes\n\n## Ablations\n\n<!-- accuracy:x:begin -->\nt\n<!-- accuracy:x:end -->\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "<!-- accuracy:begin -->\n<!-- accuracy:begin -->\n<!-- accuracy:end -->\n",
        "<!-- accuracy:end -->\n<!-- accuracy:begin -->\n",
        "<!-- accuracy:begin -->\n",
    ],
)
def test_update_document_refuses_unpaired_markers(text: str) -> None:
    with pytest.raises(ValueError, match="expected one <!-- accuracy:begin -->"):
        update_document(text, "x\n", None)


def test_defect_name_of_an_image() -> None:
    mask = np.ones((2, 2), bool)

    def channel(name: str) -> GroundTruthChannel:
        return GroundTruthChannel(mask, DefectSpec(name, 255, 1.0, True))

    assert defect_name([]) == "good"
    assert defect_name([channel("missing"), channel("missing")]) == "missing"
    assert defect_name([channel("scratch"), channel("bent"), channel("bent")]) == "bent+scratch"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,0"], "--seeds"),
        (["--seeds", "a"], "--seeds"),
        (["--categories", "bottle"], "--categories"),
        (["--n-test", "0"], "--n-test must be in 1..1000"),
        (["--n-train", "1001"], "--n-train must be in 1..1000"),
        (["--tag", "a b"], "--tag"),
        (["--set", "train.seed=3"], "--set train.seed"),
        (["--fusion-variant", "max"], "expected NAME:FIELD=VALUE"),
        (["--fusion-variant", "a b:merge=max"], "expected NAME:FIELD=VALUE"),
        (["--fusion-variant", "m:merge=max", "--fusion-variant", "m:sigma=2"], "used twice"),
        (["--fusion-variant", "m:merge=mean"], "merge must be one of"),
        (["--fusion-variant", "m:nope=1"], "no field 'nope'"),
        (["--set", "logical.nope=1"], "no field 'nope'"),
        (["--preset", "cpu", "--set", "train.epochs=x"], "train.epochs"),
    ],
)
def test_bad_options_exit_2_before_any_work(tmp_path: Path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(accuracy, "run_builds", _fail_if_called)
    assert accuracy.main([*args, "--out", str(tmp_path / "A.md")]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_malformed_document_exits_2_and_is_kept(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(accuracy, "run_builds", _fail_if_called)
    doc = tmp_path / "A.md"
    doc.write_text("<!-- accuracy:end -->\n")
    assert accuracy.main(["--out", str(doc)]) == 2
    assert str(doc) in capsys.readouterr().err
    assert doc.read_text() == "<!-- accuracy:end -->\n"


def _fail_if_called(*_):
    raise AssertionError("options were not checked before the builds")


def test_ctrl_c_exits_130_and_leaves_the_document(tmp_path: Path, monkeypatch) -> None:
    def interrupted(plan, work, done, earlier):
        assert work.is_dir() and done == {} and earlier == 0
        raise KeyboardInterrupt

    monkeypatch.setattr(accuracy, "run_builds", interrupted)
    doc = tmp_path / "A.md"
    doc.write_text("kept\n")
    assert accuracy.main(["--out", str(doc)]) == 130
    assert doc.read_text() == "kept\n" and sorted(tmp_path.iterdir()) == [doc]


def test_main_writes_the_document_and_the_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(accuracy, "run_builds", lambda plan, work, done, earlier: RECORDS)
    # the commit is the one the run started from, even if the tree changes meanwhile
    commits = iter(["abc123", "def456 (dirty)"])
    monkeypatch.setattr(accuracy, "git_commit", lambda: next(commits, "later"))
    doc = tmp_path / "docs" / "ACCURACY.md"
    assert accuracy.main(["--out", str(doc), "--seeds", "0,1"]) == 0
    assert "| **overall** | 0.750 ± 0.071 | 0.850 ± 0.071 | – |" in doc.read_text()
    saved = json.loads((doc.parent / "accuracy.json").read_text())
    assert saved["builds"] == RECORDS and saved["meta"]["seeds"] == [0, 1]
    assert saved["meta"]["commit"] == "abc123"
    assert saved["meta"]["command"] == "python -m tools.accuracy --out " + str(doc) + " --seeds 0,1"
    assert accuracy.main(["--out", str(doc), "--tag", "mff"]) == 0
    assert "<!-- accuracy:mff:begin -->" in doc.read_text()
    assert (doc.parent / "accuracy-mff.json").is_file()


def fake_builds(monkeypatch, tmp_path: Path, interrupt_at: int = 0) -> list[tuple[str, int]]:
    """Stand-in builds (no data, no training); returns the (category, seed) list each build
    appends to, and raises Ctrl-C at build number ``interrupt_at``."""
    built: list[tuple[str, int]] = []

    def build(root, category, out, config, device, **_):
        built.append((category, config.train.seed))
        if len(built) == interrupt_at:
            raise KeyboardInterrupt
        return SimpleNamespace(category=category, metrics={})

    def build_record(result, dataset, seed, seconds, calibrated=()):
        return record(result.category, seed, {"fused": 0.5 + 0.1 * seed})

    monkeypatch.setattr(accuracy, "ensure_dataset", lambda plan, category, seed: tmp_path)
    monkeypatch.setattr(accuracy, "build_category", build)
    monkeypatch.setattr(accuracy, "LocoDataset", lambda root, category: None)
    monkeypatch.setattr(accuracy, "build_record", build_record)
    return built


def test_an_interrupted_run_keeps_its_builds_and_resumes(tmp_path: Path, capsys, monkeypatch):
    doc = tmp_path / "A.md"
    doc.write_text("kept\n")
    argv = ["--out", str(doc), "--categories", "pushpins,screw_bag", "--seeds", "0,1"]
    partial = tmp_path / "accuracy.partial.json"
    built = fake_builds(monkeypatch, tmp_path, interrupt_at=3)
    assert accuracy.main(argv) == 130
    assert "--resume" in capsys.readouterr().err and doc.read_text() == "kept\n"
    kept = json.loads(partial.read_text())["builds"]
    assert [(b["category"], b["seed"]) for b in kept] == built[:2]
    assert not (tmp_path / "accuracy.json").exists()

    # a plain rerun would overwrite them: refused, nothing built or changed
    built.clear()
    assert accuracy.main(argv) == 2
    assert "add --resume" in capsys.readouterr().err and built == []
    assert json.loads(partial.read_text())["builds"] == kept

    assert accuracy.main([*argv, "--resume"]) == 0
    assert built == [("pushpins", 1), ("screw_bag", 1)]  # only what was missing
    assert "2 finished builds" in capsys.readouterr().out
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert [(b["category"], b["seed"]) for b in saved["builds"]] == [
        ("pushpins", 0),
        ("screw_bag", 0),
        ("pushpins", 1),
        ("screw_bag", 1),
    ]
    assert saved["builds"][:2] == kept and "| **overall** |" in doc.read_text()
    assert not partial.exists()


@pytest.mark.parametrize(
    ("changed", "named"),
    [(["--seeds", "0,1,2"], "seeds"), (["--set", "fusion.sigma=2"], "overrides")],
)
def test_resume_refuses_a_run_with_other_settings(tmp_path, capsys, monkeypatch, changed, named):
    argv = ["--out", str(tmp_path / "A.md"), "--categories", "pushpins", "--seeds", "0,1"]
    built = fake_builds(monkeypatch, tmp_path, interrupt_at=2)
    assert accuracy.main(argv) == 130
    partial = tmp_path / "accuracy.partial.json"
    before = partial.read_text()
    built.clear()
    assert accuracy.main([*argv, *changed, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and named in err and built == []
    assert partial.read_text() == before


def test_resume_without_an_interrupted_run_builds_everything(tmp_path, capsys, monkeypatch):
    built = fake_builds(monkeypatch, tmp_path)
    argv = ["--out", str(tmp_path / "A.md"), "--categories", "pushpins", "--seeds", "0"]
    assert accuracy.main([*argv, "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out and built == [("pushpins", 0)]
    assert not (tmp_path / "accuracy.partial.json").exists()


def test_write_atomic_keeps_the_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        new = tmp_path / "new.md"
        write_atomic(new, "a")
        assert new.read_text() == "a" and stat.S_IMODE(new.stat().st_mode) == 0o644
        new.chmod(0o664)
        write_atomic(new, "b")
        assert new.read_text() == "b" and stat.S_IMODE(new.stat().st_mode) == 0o664
    finally:
        os.umask(umask)
    assert sorted(tmp_path.iterdir()) == [new]


def test_dataset_cache_is_reused_only_for_the_same_settings(tmp_path: Path) -> None:
    args = accuracy.parse_args(["--cache-dir", str(tmp_path), "--out", str(tmp_path / "A.md")])
    args.n_train, args.n_validation, args.n_test = 1, 1, 1
    plan = accuracy.make_plan(args)
    root = accuracy.ensure_dataset(plan, "pushpins", 3)
    assert root == tmp_path / "seed3"
    image = root / "pushpins" / "train" / "good" / "000.png"
    stamp = image.stat().st_mtime_ns
    assert accuracy.ensure_dataset(plan, "pushpins", 3) == root
    assert image.stat().st_mtime_ns == stamp
    more = accuracy.make_plan(args.__class__(**{**vars(args), "n_test": 2}))
    accuracy.ensure_dataset(more, "pushpins", 3)
    assert len(list((root / "pushpins" / "test" / "good").iterdir())) == 2


def _mann_whitney(good: list[float], bad: list[float]) -> float:
    """Independent AUROC: the share of (good, bad) pairs ordered right, ties counting half."""
    pairs = [(b > g) + 0.5 * (b == g) for g in good for b in bad]
    return sum(pairs) / len(pairs)


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path: Path, capsys, tiny_build_args: list[str]) -> None:
    tiny = [arg for arg in tiny_build_args if arg.startswith("--set=")]
    tiny += ["--set=text_prior=learned", "--set=train.epochs=1"]
    doc = tmp_path / "ACCURACY.md"
    argv = ["--categories=pushpins", "--seeds=0", "--n-train=8", "--n-validation=4"]
    argv += ["--n-test=5", f"--cache-dir={tmp_path / 'cache'}", f"--out={doc}", "--keep", *tiny]
    # "same" repeats the preset's own fusion, so its column must equal fused exactly
    own = cpu_build_preset().fusion
    other = next(m for m in MERGES if m != own.merge)
    argv += [
        f"--fusion-variant=same:merge={own.merge},image_scale={own.image_scale}",
        f"--fusion-variant=other:merge={other}",
    ]
    assert accuracy.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[accuracy 1/1\] pushpins seed 0: mean image AUROC .*fused", out)

    (build,) = json.loads((tmp_path / "accuracy.json").read_text())["builds"]
    branches = list(build["metrics"])
    assert {"logical", "structural", "fused", "fused[same]", "fused[other]"} <= set(branches)
    assert build["metrics"]["fused[same]"] == build["metrics"]["fused"]
    assert build["image_scores"]["fused[same]"] == build["image_scores"]["fused"]
    assert build["image_scores"]["fused[other]"] != build["image_scores"]["fused"]
    text = doc.read_text()
    for title in ("Image AUROC", "AU-sPRO@0.05"):
        for subset in ("logical", "structural", "mean"):
            table = text.split(f"### {title}, {subset} subset\n", 1)[1].split("\n\n")[0].strip()
            assert table.splitlines()[0] == "| category | " + " | ".join(branches) + " |"
            assert "–" not in table and "| **overall** |" in table

    defects = np.asarray(build["test_defects"])
    kinds = build["defect_kinds"]
    assert len(defects) == 15 and (defects == "good").sum() == 5
    kept = Path(re.search(r"artifacts kept in (\S+)", out)[1])
    saved = read_manifest(kept / "pushpins-seed0")
    manifest = saved["metrics"]
    shutil.rmtree(kept)
    # validation images scored per branch like the test images; fused: the calibration's own
    validation = build["validation_image_scores"]
    assert sorted(validation) == sorted(b for b in branches if "[" not in b)
    assert validation["fused"] == pytest.approx(saved["validation_scores"])
    assert all(len(v) == 4 and np.isfinite(v).all() for v in validation.values())
    assert sorted(manifest) == sorted(b for b in branches if "[" not in b)
    for branch in branches:
        scores = np.asarray(build["image_scores"][branch])
        good = list(scores[defects == "good"])
        per_defect = build["metrics"][branch]["image_auroc_per_defect"]
        assert sorted(per_defect) == sorted(set(defects) - {"good"}) == sorted(kinds)
        for name, value in per_defect.items():
            assert value == pytest.approx(_mann_whitney(good, list(scores[defects == name])))
        if branch in manifest:
            assert manifest[branch]["image_auroc_per_defect"] == pytest.approx(per_defect)
        spro = build["metrics"][branch][SPRO_PER_DEFECT]
        for subset, kind in (
            ("logical_anomalies", "logical"),
            ("structural_anomalies", "structural"),
        ):
            assert sorted(spro[subset]) == sorted(d for d, k in kinds.items() if k == kind)
            assert all(0 <= v <= 1 for v in spro[subset].values())
        # the scores are those the LOCO metric ranks: its subset AUROC follows from them
        logical = [s for s, d in zip(scores, defects) if kinds.get(d) == "logical"]
        subset = build["metrics"][branch]["image_auroc_tie_correct"]["logical_anomalies"]
        assert subset == pytest.approx(_mann_whitney(good, logical))


def test_collapse_table_lists_each_build_and_its_collapsed_levels() -> None:
    healthy = {"ratio": {"layer1": 0.61, "layer2": 0.5}, "collapsed_levels": [], "epoch": 48}
    collapsed = {"ratio": {"layer1": 0.6, "layer2": 0.04}, "collapsed_levels": ["layer2"]}
    records = [
        {"category": "pushpins", "seed": 0, "logical_diagnostics": healthy},
        {"category": "screw_bag", "seed": 1, "logical_diagnostics": collapsed},
        {"category": "juice_bottle", "seed": 0, "logical_diagnostics": {}},
    ]
    assert collapse_table(records).splitlines() == [
        "| category | seed | layer1 | layer2 | collapsed |",
        "| --- | --- | ---: | ---: | ---: |",
        "| pushpins | 0 | 0.61 | 0.50 | none |",
        "| screw_bag | 1 | 0.60 | 0.04 | layer2 |",
    ]
