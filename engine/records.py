"""Inspection records for quality audits: one row per scored frame, as JSON lines or CSV.

    with ResultLog("line3.jsonl", runtime, source="rtsp://cam/1") as log:
        for frame, result in runtime.stream(source):
            log.write(result)

Each row: UTC timestamp (ISO 8601), source, frame index, score, threshold, verdict
(``anomalous`` / ``ok``), latency in ms, and the artifact's manifest sha256 (which engine
decided). The format follows the file suffix (``.jsonl`` or ``.csv``); rows are appended and
flushed one by one, so a crash loses at most the row being written.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from engine.artifact_manifest import SEAL_KEY

__all__ = ["COLUMNS", "FORMATS", "ResultLog", "check_log_path"]

COLUMNS = (
    "timestamp", "source", "frame", "score", "threshold", "verdict", "latency_ms", "artifact_sha256",
)  # fmt: skip
FORMATS = (".jsonl", ".csv")


def check_log_path(path: Path, what: str = "records file") -> Path:
    """``path`` if its suffix names a record format, else ValueError saying which do (``what``:
    how to name the path in the message, e.g. the option that gave it)."""
    if path.suffix not in FORMATS:
        raise ValueError(f"{what} {path}: the file must end in one of {FORMATS}")
    return path


class ResultLog:
    """Append one row per :class:`engine.runtime.Result` to ``path`` (``.jsonl`` or ``.csv``)."""

    def __init__(self, path: str | Path, runtime: Any, source: object = "") -> None:
        self.path = check_log_path(Path(path))
        self.artifact = str(runtime.manifest.get(SEAL_KEY, ""))
        self.source = str(source)
        self._file: TextIO | None = None
        self._csv: Any = None

    def __enter__(self) -> ResultLog:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", encoding="utf-8", newline="")
        if self.path.suffix == ".csv":
            self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
            if new:
                self._csv.writeheader()
        return self

    def write(self, result: Any, source: object = None) -> dict[str, Any]:
        """Append the row of ``result`` (``source``: this row's, e.g. an image file, instead of
        the log's) and return it."""
        if self._file is None:
            raise RuntimeError("ResultLog.write outside its with-block")
        row = {
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "source": self.source if source is None else str(source),
            "frame": result.source_index,
            "score": result.score,
            "threshold": result.threshold,
            "verdict": "anomalous" if result.is_anomalous else "ok",
            "latency_ms": round(result.latency_ms, 3),
            "artifact_sha256": self.artifact,
        }
        if self._csv is not None:
            self._csv.writerow(row)
        else:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        return row

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
