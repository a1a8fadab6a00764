import json

import numpy as np
import pytest

from engine.data.types import GOOD, LOGICAL, STRUCTURAL
from engine.metrics.loco import MAX_FPRS, LocoMetrics, compute_loco_metrics
from engine.metrics.report import format_table, write_metrics_json


def partial_metrics() -> LocoMetrics:
    """Logical values only: structural and mean are undefined (None)."""
    empty = {LOGICAL: 0.5, STRUCTURAL: None, "mean": None}
    return LocoMetrics(
        auroc={LOGICAL: 0.8333333, STRUCTURAL: None, "mean": None},
        auroc_tie_correct={LOGICAL: 1.0, STRUCTURAL: None, "mean": None},
        auc_spro={key: dict.fromkeys(MAX_FPRS, value) for key, value in empty.items()},
        spro_curves={},
        roc_curves={},
        image_scores={GOOD: np.zeros(1), LOGICAL: np.ones(1), STRUCTURAL: np.zeros(0)},
        thresholds=np.zeros(0),
        max_fprs=MAX_FPRS,
    )


def test_metrics_json_is_the_official_shape(tmp_path, loco_case, reference_au_spro):
    metrics = compute_loco_metrics(loco_case.maps, loco_case.types, loco_case.channels)
    path = write_metrics_json(metrics, tmp_path / "out")
    assert path == tmp_path / "out" / "metrics.json"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
    text = path.read_text()
    content = json.loads(text)
    assert text == json.dumps(content, indent=4, sort_keys=True)  # keys sorted, as official
    assert content["classification"]["auc_roc"][LOGICAL] == pytest.approx(5 / 6)
    assert content["classification"]["auc_roc_tie_correct"]["mean"] == 1.0
    spro = content["localization"]["auc_spro"]
    for key, expected in reference_au_spro.items():
        got = [spro[key][str(limit)] for limit in MAX_FPRS]
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_metrics_json_writes_null_for_undefined_values(tmp_path):
    content = json.loads(write_metrics_json(partial_metrics(), tmp_path).read_text())
    assert content["classification"]["auc_roc"] == {
        LOGICAL: 0.8333333,
        STRUCTURAL: None,
        "mean": None,
    }
    assert content["localization"]["auc_spro"]["mean"]["0.05"] is None


def test_table_rows_and_columns():
    lines = format_table(partial_metrics()).splitlines()
    header = lines[0].split()
    assert header[:4] == ["AUROC", "AUROC", "tie-correct", "AU-sPRO@0.01"]
    assert header[-1] == "AU-sPRO@1"
    assert set(lines[1]) == {"-"}
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == ["logical", "structural", "mean"]
    assert rows["logical"] == ["0.833", "1.000"] + ["0.500"] * len(MAX_FPRS)
    assert rows["structural"] == ["-"] * (2 + len(MAX_FPRS))
    # Right-aligned columns: every line has the same length.
    assert len({len(line) for line in lines}) == 1
