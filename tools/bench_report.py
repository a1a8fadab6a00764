"""Turn a ``pytest benchmarks --benchmark-json FILE`` result into the Runtime table of
``docs/PERFORMANCE.md``.

    python -m tools.bench_report FILE.json [--date YYYY-MM-DD]

One row per Runtime case (those with ``p50_ms`` in ``extra_info``, see
``benchmarks/test_runtime.py``): p50/p95, images/s, first call, peak GPU memory, the largest
fused-map difference from ``eager``, and the speed-up over ``eager`` at the same preset, batch,
precision and kNN index *from the same run* (no row is compared with another run's figures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli import description

COLUMNS = (
    "case", "device", "preset", "features", "p50 ms", "p95 ms", "img/s", "first call ms",
    "peak GPU MiB", "max map diff vs eager", "speed-up vs eager",
)  # fmt: skip


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def rows(report: dict) -> list[list[str]]:
    """The table rows of a pytest-benchmark JSON report, in its order."""
    cases = [b for b in report.get("benchmarks", []) if "p50_ms" in b.get("extra_info", {})]
    if not cases:
        raise ValueError("no Runtime cases (extra_info.p50_ms) in this benchmark report")

    def key(info: dict) -> tuple:
        return info["device"], info["preset"], info["batch"], info["precision"], info.get("index")

    eager = {
        key(b["extra_info"]): b["extra_info"]["p50_ms"]
        for b in cases
        if b["extra_info"]["backend"] == "eager" and b["extra_info"].get("features") == "compact"
    }
    table = []
    for case in cases:
        info = case["extra_info"]
        base = eager.get(key(info))
        table.append(
            [
                case["name"],
                info["device"],
                info["preset"],
                info.get("features", "–"),
                _number(info["p50_ms"]),
                _number(info["p95_ms"]),
                _number(info["images_per_s"]),
                _number(info["first_call_ms"], 0),
                _number(info.get("peak_mib"), 0),
                f"{info['max_map_diff_vs_eager']:.1e}",
                "–" if base is None else f"{base / info['p50_ms']:.2f}×",
            ]
        )
    return table


def markdown(table: list[list[str]], machine: str) -> str:
    lines = [f"Measured {machine}.", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_report", description=description(__doc__)
    )
    parser.add_argument("report", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        table = rows(report)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"bench_report: {args.report}: {error}", file=sys.stderr)
        return 2
    info = report.get("machine_info", {})
    when = report.get("datetime", "")[:10] or "on an unknown date"
    cpu = info.get("cpu", {}).get("brand_raw", "cpu unknown")
    machine = f"on {info.get('node', 'an unknown machine')} ({cpu}), {when}"
    print(markdown(table, machine), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
