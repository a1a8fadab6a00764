"""Turn a ``pytest benchmarks --benchmark-json FILE`` result into the Runtime table of
``docs/PERFORMANCE.md``.

    python -m tools.bench_report FILE.json [--date YYYY-MM-DD]

One row per Runtime case (those with ``p50_ms`` in ``extra_info``, see
``benchmarks/test_runtime.py``): p50/p95, images/s, first call, peak GPU memory, the largest
fused-map difference from ``eager``, and the speed-up over ``eager`` at the same preset, batch,
precision and kNN index *from the same run* (no row is compared with another run's figures).
Paired cases (``extra_info.paired``, ``benchmarks/test_runtime_real_bank.py``) follow in a
second table: both backends' p50 and the median of their frame-by-frame ratio with its 95 %
bootstrap interval.
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
    """The table rows of a pytest-benchmark JSON report, in its order (none: no such cases)."""
    cases = [b for b in report.get("benchmarks", []) if "p50_ms" in b.get("extra_info", {})]

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


PAIRED_COLUMNS = (
    "case", "index", "rounds", "p50 ms", "median per-frame speed-up (95 % interval)",
    "max map diff",
)  # fmt: skip


def paired_rows(report: dict) -> list[list[str]]:
    """One row per paired case: the second backend against the first, frame by frame."""
    table = []
    for case in report.get("benchmarks", []):
        paired = case.get("extra_info", {}).get("paired")
        if paired is None:
            continue
        first, second = paired["backends"]
        low, high = paired["speedup_ci95"]
        table.append(
            [
                case["name"],
                case["extra_info"].get("index", "–"),
                str(paired["rounds"]),
                f"{first} {_number(paired[f'{first}_p50_ms'])}, "
                f"{second} {_number(paired[f'{second}_p50_ms'])}",
                f"{second} {paired['speedup_median']:.2f}× ({low:.2f}–{high:.2f}×) vs {first}",
                f"{paired['max_map_diff_vs_eager']:.1e}",
            ]
        )
    return table


def _table(columns: tuple[str, ...], table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in table]


def markdown(table: list[list[str]], machine: str, paired: list[list[str]] | None = None) -> str:
    lines = [f"Measured {machine}."] + (["", *_table(COLUMNS, table)] if table else [])
    if paired:
        lines += ["", "Paired (frame by frame, alternating order):", ""]
        lines += _table(PAIRED_COLUMNS, paired)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_report", description=description(__doc__)
    )
    parser.add_argument("report", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        table, paired = rows(report), paired_rows(report)
        if not table and not paired:
            raise ValueError("no Runtime cases (extra_info.p50_ms or .paired) in this report")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"bench_report: {args.report}: {error}", file=sys.stderr)
        return 2
    info = report.get("machine_info", {})
    when = report.get("datetime", "")[:10] or "on an unknown date"
    cpu = info.get("cpu", {}).get("brand_raw", "cpu unknown")
    machine = f"on {info.get('node', 'an unknown machine')} ({cpu}), {when}"
    print(markdown(table, machine, paired), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
