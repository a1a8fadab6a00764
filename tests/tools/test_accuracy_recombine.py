"""tools.accuracy_recombine: branch scores of two runs fused at image level."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools import accuracy_recombine

DEFECTS = ["good"] * 4 + ["count"] * 2 + ["scratch"] * 2
KINDS = {"count": "logical", "scratch": "structural"}
VALIDATION = [0.0, 1.0, 2.0, 3.0, 4.0]


def build(composition: list[float], structural: list[float], fused: list[float]) -> dict:
    return {
        "category": "a",
        "seed": 0,
        "test_defects": DEFECTS,
        "defect_kinds": KINDS,
        "image_scores": {
            "logical": [0.0] * 8,
            "structural": structural,
            "composition": composition,
            "fused": fused,
        },
        "validation_image_scores": {
            b: VALIDATION for b in ("logical", "structural", "composition", "fused")
        },
    }


def write(path: Path, builds: list[dict]) -> Path:
    path.write_text(json.dumps({"format": 1, "builds": builds}))
    return path


# Every branch has the validation scores 0..4: mean 2, population std sqrt(2) (pooled: the
# same), median 2 and MAD 1.4826; so a score s counts (s - 2) / sqrt(2) in a map branch and
# (s - 2) / 1.4826 in the composition branch.
GOOD = [1.0, 2.0, 2.0, 1.0]


def fused_of(structural: list[float], composition: list[float]) -> list[float]:
    return list(
        np.maximum.reduce(
            [
                (np.zeros(8) - 2) / np.sqrt(2),
                (np.array(structural) - 2) / np.sqrt(2),
                (np.array(composition) - 2) / 1.4826,
            ]
        )
    )


def test_takes_a_branch_from_the_other_run(tmp_path: Path, capsys) -> None:
    # the base run sees the scratches, the other run's composition branch sees the counts
    structural = [*GOOD, 2.0, 2.0, 9.0, 9.0]
    weak = [*GOOD, 1.5, 1.5, 1.0, 1.0]
    strong = [*GOOD, 9.0, 9.0, 1.0, 1.0]
    base = build(weak, structural, fused_of(structural, weak))
    other = build(strong, [0.0] * 8, fused_of([0.0] * 8, strong))
    base_path = write(tmp_path / "base.json", [base])
    other_path = write(tmp_path / "other.json", [other])
    assert accuracy_recombine.main([str(base_path), "--take", f"composition={other_path}"]) == 0
    out = capsys.readouterr().out
    # base: logical subset 0.750 (1.5 against good 1, 2, 2, 1), structural 1.000
    assert (
        "| a | 0 | 0.750 / 1.000 / 0.875 | 0.750 / 1.000 / 0.875 | 1.000 / 1.000 / 1.000 |" in out
    )
    assert "| **mean** |" in out


def test_bad_inputs_exit_2_with_a_message(tmp_path: Path, capsys) -> None:
    base = build([0.0] * 8, [0.0] * 8, [0.0] * 8)
    base_path = write(tmp_path / "base.json", [base])
    other = {**base, "test_defects": list(reversed(DEFECTS))}
    other_path = write(tmp_path / "other.json", [other])
    apart = write(tmp_path / "apart.json", [{**base, "seed": 1}])
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    cases = [
        ([], "nothing to recombine"),
        (["--take", f"shape={other_path}"], "BRANCH one of"),
        (["--take", f"composition={other_path}"], "test images differ"),
        (["--take", f"composition={apart}"], "share no"),
        (["--take", f"composition={not_json}"], "not an accuracy JSON"),
        (["--take", f"composition={base_path}", "--set", "fusion.merge=sum"], "merge='max'"),
        (["--take", f"composition={base_path}", "--set", "fusion.nope=1"], "no field 'nope'"),
        (
            ["--take", f"composition={base_path}", "--set", "structural.image_size=448"],
            "only fusion.FIELD=VALUE",
        ),
    ]
    for extra, message in cases:
        assert accuracy_recombine.main([str(base_path), *extra]) == 2, extra
        assert message in capsys.readouterr().err


def test_fusion_overrides_apply() -> None:
    fusion = accuracy_recombine.fusion_config(["fusion.composition_scale=std"])
    assert fusion.composition_scale == "std" and fusion.merge == "max"
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        accuracy_recombine.fusion_config(["fusion.sigma"])


def test_scores_a_build_calibrated_itself_are_taken_as_they_are() -> None:
    """A composition branch with fine parts standardises its own scores: fusion adds them as
    they are, and so does the recombination."""
    structural, composition = [1.0, 2.0, 2.0, 1.0, 3.0, 2.0, 9.0, 9.0], [0.5] * 6 + [0.0] * 2
    base = build(composition, structural, [0.0] * 8) | {"calibrated_branches": ["composition"]}
    fusion = accuracy_recombine.fusion_config([])
    got = accuracy_recombine.fused_scores({b: base for b in ("structural", "composition")}, fusion)
    expected = np.maximum((np.array(structural) - 2) / np.sqrt(2), composition)
    np.testing.assert_allclose(got, expected)
