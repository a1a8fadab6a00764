"""Results out: ``metrics.json`` (atomic; the official format for LOCO) and a terminal table."""

from __future__ import annotations

import json
from pathlib import Path

from engine.atomic import atomic_file
from engine.data.types import LOGICAL, STRUCTURAL
from engine.metrics.evaluators import TestMetrics, metric_cells, metrics_json
from engine.metrics.loco import MEAN, LocoMetrics

METRICS_FILE = "metrics.json"
_ROWS = ((LOGICAL, "logical"), (STRUCTURAL, "structural"), (MEAN, "mean"))


def write_metrics_json(metrics: TestMetrics, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/metrics.json`` (indent 4, sorted keys, as the official script) atomically:
    the official LOCO content for LOCO metrics, else :func:`metrics_json`'s keys."""
    path = Path(out_dir) / METRICS_FILE
    content = (
        metrics.to_official_json() if isinstance(metrics, LocoMetrics) else metrics_json(metrics)
    )
    with atomic_file(path, text=True) as f:
        json.dump(content, f, indent=4, sort_keys=True)
    return path


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(metrics: TestMetrics) -> str:
    """LOCO: rows logical / structural / mean; columns official AUROC, tie-correct AUROC and
    AU-sPRO at each integration limit (3 decimals like the official print script; "-" = undefined).
    Other levels: one row of :func:`metric_cells`."""
    if not isinstance(metrics, LocoMetrics):
        cells = metric_cells(metrics)
        widths = [max(len(name), 5) for name in cells]
        header = "  ".join(name.rjust(w) for name, w in zip(cells, widths))
        values = "  ".join(_cell(v).rjust(w) for v, w in zip(cells.values(), widths))
        return "\n".join([header, "-" * len(header), values])
    header = ["", "AUROC", "AUROC tie-correct"] + [
        f"AU-sPRO@{limit:g}" for limit in metrics.max_fprs
    ]
    rows = [header]
    for key, label in _ROWS:
        rows.append(
            [label, _cell(metrics.auroc[key]), _cell(metrics.auroc_tie_correct[key])]
            + [_cell(metrics.auc_spro[key][limit]) for limit in metrics.max_fprs]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
