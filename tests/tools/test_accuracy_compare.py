"""tools.accuracy_compare: paired per-seed differences of two benchmark runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import accuracy_compare


def build(category: str, seed: int, logical: float, structural: float, spro: float) -> dict:
    fused = {
        "image_auroc_tie_correct": {
            "logical_anomalies": logical,
            "structural_anomalies": structural,
            "mean": (logical + structural) / 2,
        },
        "au_spro_0.05": {"mean": spro},
    }
    return {"category": category, "seed": seed, "metrics": {"fused": fused, "fused[x]": fused}}


def write(path: Path, builds: list[dict], machine: str | None = None) -> Path:
    meta = {} if machine is None else {"meta": {"machine": machine}}
    path.write_text(json.dumps({"format": 1, **meta, "builds": builds}))
    return path


def test_pairs_by_category_and_seed_and_reports_each_seed(tmp_path: Path, capsys) -> None:
    base = write(
        tmp_path / "base.json",
        [
            build("a", 0, 0.8, 0.9, 0.6),
            build("b", 0, 0.6, 0.7, 0.5),
            build("a", 1, 0.8, 0.8, 0.6),
            build("c", 1, 0.1, 0.1, 0.1),  # not in the new run: left out
        ],
    )
    new = write(
        tmp_path / "new.json",
        [build("a", 0, 0.9, 0.9, 0.7), build("b", 0, 0.6, 0.8, 0.5), build("a", 1, 0.7, 0.8, 0.6)],
    )
    assert accuracy_compare.main([str(base), str(new)]) == 0
    out = capsys.readouterr().out
    # seed 0: two categories, image L 0.700 -> 0.750, S 0.800 -> 0.850, mean 0.750 -> 0.800
    assert "| 0 | 2 | 0.700 | 0.800 | 0.750 | 0.550 | 0.750 | 0.850 | 0.800 | 0.600 |" in out
    assert "| +0.050 | +0.050 | +0.050 | +0.050 |" in out
    assert "| 1 | 1 | 0.800 | 0.800 | 0.800 | 0.600 | 0.700 | 0.800 | 0.750 | 0.600 |" in out
    assert "| **mean** |" in out and "| -0.025 | +0.025 | +0.000 | +0.025 |" in out
    assert "| a | 2 | 0.825 | 0.825 | +0.000 |" in out and "| c |" not in out


def test_two_branches_of_one_run(tmp_path: Path, capsys) -> None:
    run = write(tmp_path / "run.json", [build("a", 0, 0.8, 0.9, 0.6)])
    assert accuracy_compare.main([str(run), str(run), "--new-branch", "fused[x]"]) == 0
    assert "| +0.000 | +0.000 | +0.000 | +0.000 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("machines", "warned"),
    [(("Xeon", "EPYC"), True), (("EPYC", "EPYC"), False), (("EPYC", None), False)],
)
def test_runs_from_different_machines_are_compared_with_a_warning(
    tmp_path: Path, capsys, machines: tuple[str | None, str | None], warned: bool
) -> None:
    builds = [build("a", 0, 0.8, 0.9, 0.6)]
    base = write(tmp_path / "base.json", builds, machines[0])
    new = write(tmp_path / "new.json", builds, machines[1])
    assert accuracy_compare.main([str(base), str(new)]) == 0
    captured = capsys.readouterr()
    assert "| +0.000 | +0.000 | +0.000 | +0.000 |" in captured.out
    assert ("different machines (Xeon; EPYC)" in captured.err) == warned


@pytest.mark.parametrize(
    ("builds", "args", "message"),
    [
        ([build("a", 0, 0.8, 0.9, 0.6)], ["--branch", "nope"], "no branch 'nope' in a seed 0"),
        ([build("b", 1, 0.8, 0.9, 0.6)], [], "share no (category, seed) build"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, capsys, builds, args, message) -> None:
    base = write(tmp_path / "base.json", [build("a", 0, 0.8, 0.9, 0.6)])
    new = write(tmp_path / "new.json", builds)
    assert accuracy_compare.main([str(base), str(new), *args]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_file_exits_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert accuracy_compare.main([str(bad), str(tmp_path / "missing.json")]) == 2
    assert "not an accuracy JSON" in capsys.readouterr().err
