"""Paired comparison of two accuracy-benchmark runs (or two branches of one run).

    python -m tools.accuracy_compare docs/accuracy.json docs/accuracy-s448.json
    python -m tools.accuracy_compare docs/accuracy.json docs/accuracy.json --new-branch "fused[sum]"

Builds are paired by (category, seed): only the pairs present in both files count, so a run on
fewer categories or seeds compares on what it shares with the other. Prints, as Markdown, per
seed the mean over the shared categories of image AUROC (logical / structural / mean subsets)
and AU-sPRO@0.05 (mean subset) for both runs and their difference, and per category the mean
image AUROC over the shared seeds. A setting is worth adopting when its difference holds in
every seed, not only on average (docs/ACCURACY.md states each adoption rule). Runs from
different machines are compared with a warning: the logical branch's training rounds
differently on another CPU model, which alone moved per-seed fused means by up to 0.004
(docs/ACCURACY.md, ablation 12).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.cli import description
from tools.accuracy_report import markdown_table, read_run

EXIT_BAD_INPUT = 2
# (metric, subset) columns of the per-seed table
COLUMNS = (
    ("image_auroc_tie_correct", "logical_anomalies", "image L"),
    ("image_auroc_tie_correct", "structural_anomalies", "image S"),
    ("image_auroc_tie_correct", "mean", "image mean"),
    ("au_spro_0.05", "mean", "AU-sPRO mean"),
)


def load_builds(path: Path, branch: str) -> tuple[str | None, dict[tuple[str, int], dict]]:
    """The machine an accuracy JSON's run was made on (None when it does not say) and
    ``branch``'s metrics of every build in it, by (category, seed)."""
    meta, builds = read_run(path)
    try:
        by_key = {key: build["metrics"] for key, build in builds.items()}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an accuracy JSON ({error})") from None
    missing = sorted(f"{c} seed {s}" for (c, s), m in by_key.items() if branch not in m)
    if missing:
        raise ValueError(f"{path}: no branch {branch!r} in {', '.join(missing)}")
    return meta.get("machine"), {key: metrics[branch] for key, metrics in by_key.items()}


def value(metrics: dict, metric: str, subset: str) -> float:
    number = metrics[metric].get(subset)
    return float("nan") if number is None else float(number)


def compare(base: dict[tuple[str, int], dict], new: dict[tuple[str, int], dict]) -> str:
    """The Markdown per-seed and per-category tables of the pairs both runs hold."""
    pairs = sorted(set(base) & set(new), key=lambda key: (key[1], key[0]))
    if not pairs:
        raise ValueError("the two runs share no (category, seed) build")
    seeds = sorted({seed for _, seed in pairs})
    categories = list(dict.fromkeys(category for category, _ in pairs))
    rows, deltas = [], []
    for seed in seeds:
        keys = [key for key in pairs if key[1] == seed]
        b = np.array([[value(base[k], m, s) for m, s, _ in COLUMNS] for k in keys]).mean(0)
        n = np.array([[value(new[k], m, s) for m, s, _ in COLUMNS] for k in keys]).mean(0)
        deltas.append(n - b)
        rows.append([str(seed), str(len(keys)), *_triples(b, n)])
    mean = np.mean(deltas, axis=0)
    rows.append(["**mean**", "", *("" for _ in range(2 * len(COLUMNS))), *_signed(mean)])
    head = ["seed", "categories"]
    head += [f"{label} {run}" for run in ("base", "new") for _, _, label in COLUMNS]
    head += [f"Δ {label}" for _, _, label in COLUMNS]
    per_seed = markdown_table(head, rows, 2)
    cat_rows = []
    for category in categories:
        keys = [key for key in pairs if key[0] == category]
        b = np.mean([value(base[k], "image_auroc_tie_correct", "mean") for k in keys])
        n = np.mean([value(new[k], "image_auroc_tie_correct", "mean") for k in keys])
        cat_rows.append([category, str(len(keys)), f"{b:.3f}", f"{n:.3f}", *_signed([n - b])])
    per_category = markdown_table(
        ["category", "seeds", "image mean base", "image mean new", "Δ"], cat_rows, 2
    )
    return f"Per seed, mean over the categories:\n\n{per_seed}\nPer category:\n\n{per_category}"


def _triples(base: np.ndarray, new: np.ndarray) -> list[str]:
    return [f"{x:.3f}" for x in base] + [f"{x:.3f}" for x in new] + _signed(new - base)


def _signed(values: Sequence[float]) -> list[str]:
    return [f"{round(float(x), 3) + 0.0:+.3f}" for x in values]  # + 0.0: no "-0.000"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.accuracy_compare", description=description(__doc__)
    )
    parser.add_argument("base", type=Path, help="the reference run's JSON")
    parser.add_argument("new", type=Path, help="the compared run's JSON (may be the same file)")
    parser.add_argument("--branch", default="fused", help="the base run's branch column")
    parser.add_argument("--new-branch", help="the new run's branch column (default: --branch)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        base_machine, base = load_builds(args.base, args.branch)
        new_machine, new = load_builds(args.new, args.new_branch or args.branch)
        print(compare(base, new), end="")
        if None not in (base_machine, new_machine) and base_machine != new_machine:
            print(
                f"warning: the runs come from different machines ({base_machine}; {new_machine}): "
                "the logical branch trains with other rounding on another CPU model, which "
                "moved per-seed fused means by up to 0.004 (docs/ACCURACY.md, ablation 12); "
                "compare runs from one machine",
                file=sys.stderr,
            )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
