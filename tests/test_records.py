"""engine.records: one flushed row per result, JSON lines or CSV, appended."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.records import COLUMNS, ResultLog

RUNTIME = SimpleNamespace(manifest={"manifest_sha256": "ab" * 32})


def result(index: int, score: float) -> SimpleNamespace:
    return SimpleNamespace(
        source_index=index, score=score, threshold=1.0, is_anomalous=score > 1.0, latency_ms=12.5
    )


def test_csv_rows_are_appended_under_one_header(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    for run in range(2):
        with ResultLog(path, RUNTIME, source="cam0") as log:
            log.write(result(run, 0.5 + run))
            assert len(path.read_text().splitlines()) == run + 2  # flushed at once
    rows = list(csv.DictReader(path.open()))
    assert [r["verdict"] for r in rows] == ["ok", "anomalous"]
    assert tuple(rows[0]) == COLUMNS and rows[1]["artifact_sha256"] == "ab" * 32


def test_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with ResultLog(path, RUNTIME, source=Path("clips/a.mp4")) as log:
        written = log.write(result(7, 3.0))
    row = json.loads(path.read_text())
    assert row == written and row["frame"] == 7 and row["source"] == "clips/a.mp4"
    assert row["timestamp"].endswith("+00:00")


def test_misuse_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.jsonl"):
        ResultLog(tmp_path / "log.txt", RUNTIME)
    with pytest.raises(RuntimeError, match="with-block"):
        ResultLog(tmp_path / "log.csv", RUNTIME).write(result(0, 0.0))
    assert not (tmp_path / "log.csv").exists()
