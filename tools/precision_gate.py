"""Accuracy gate for 16-bit inference: does a precision keep the fp32 metrics of an artifact?

    python -m tools.precision_gate --artifact A --data-root D --category C [--device cuda]

Scores the category's LOCO test split with ``Runtime.load(A, precision=P)`` for fp32 and each
``--precision`` asked for (default bf16 and fp16), and compares image AUROC (tie-correct) and
AU-sPRO@0.05 on the logical, structural and mean subsets with fp32's. A precision passes when
every image AUROC moves by at most 0.002 and every AU-sPRO by at most 0.005. Prints one line
per precision, and a note when one swapped pair of images already moves AUROC beyond the gate
(as on small test splits); with ``--out FILE`` it writes the numbers as JSON. Exit code: 0 when
every precision asked for passes, 1 when one fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.cli import DEVICES, description, setup_logging
from engine.data.loco import LocoDataset
from engine.data.types import GOOD, LOGICAL, STRUCTURAL, DatasetError
from engine.metrics import LocoMetrics
from engine.runtime import Runtime
from tools.evaluate import evaluate_category, maps_from_artifact

AUROC_GATE, SPRO_GATE = 0.002, 0.005
SPRO_LIMIT = 0.05


def split_metrics(runtime: Runtime, dataset: LocoDataset) -> dict[str, dict[str, float]]:
    """``{"auroc": {subset: value}, "spro": {subset: value}}`` of ``runtime`` on the test split."""
    metrics = evaluate_category(
        dataset, maps_from_artifact(dataset, runtime, False), progress=False
    )
    assert isinstance(metrics, LocoMetrics)
    spro = {subset: values[SPRO_LIMIT] for subset, values in metrics.auc_spro.items()}
    return {"auroc": dict(metrics.auroc_tie_correct), "spro": spro}


def swap_step(dataset: LocoDataset) -> float:
    """How far one swapped (good, anomalous) pair moves an image AUROC on this test split: 1 /
    (good x anomalous images) of its smallest subset. Above the gate's 0.002 the AUROC gate
    tolerates no swapped pair at all; judge 16-bit on a test split where it is smaller."""
    samples = dataset.samples("test")
    good = sum(s.defect_type == GOOD for s in samples)
    anomalous = [sum(s.defect_type == kind for s in samples) for kind in (LOGICAL, STRUCTURAL)]
    pairs = [good * n for n in anomalous if good * n > 0]
    return 1.0 / min(pairs) if pairs else float("nan")


def worst_changes(reference: dict, lowered: dict) -> dict[str, float]:
    """The largest |change| of image AUROC and of AU-sPRO over the subsets both define."""
    return {
        metric: max(
            (
                abs(lowered[metric][subset] - value)
                for subset, value in reference[metric].items()
                if value is not None and lowered[metric].get(subset) is not None
            ),
            default=0.0,
        )
        for metric in ("auroc", "spro")
    }


def gate(
    artifact: Path, dataset: LocoDataset, device: str, precisions: Sequence[str]
) -> dict[str, dict]:
    """Metrics of fp32 and each of ``precisions``, with each one's worst change and verdict."""
    report: dict[str, dict] = {
        "fp32": split_metrics(Runtime.load(artifact, device=device, backend="eager"), dataset),
        "swap_step": swap_step(dataset),
    }
    for precision in precisions:
        # One backend for every precision, so the gate measures the precision alone.
        runtime = Runtime.load(artifact, device=device, backend="eager", precision=precision)
        lowered = split_metrics(runtime, dataset)
        changes = worst_changes(report["fp32"], lowered)
        passed = changes["auroc"] <= AUROC_GATE and changes["spro"] <= SPRO_GATE
        report[precision] = {**lowered, "worst_change": changes, "passed": passed}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.precision_gate", description=description(__doc__)
    )
    parser.add_argument("--artifact", type=Path, required=True, help="engine.build artifact")
    parser.add_argument("--data-root", type=Path, required=True, help="LOCO-layout data root")
    parser.add_argument("--category", required=True, help="category folder under --data-root")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="inference device")
    parser.add_argument(
        "--precision",
        action="append",
        choices=("bf16", "fp16"),
        help="precision to gate (repeatable; default: bf16 and fp16)",
    )
    parser.add_argument("--out", type=Path, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        dataset = LocoDataset(args.data_root, args.category)
    except DatasetError as error:
        print(f"precision_gate: {error}", file=sys.stderr)
        return 2
    report = gate(args.artifact, dataset, args.device, args.precision or ["bf16", "fp16"])
    lowered = {k: v for k, v in report.items() if k not in ("fp32", "swap_step")}
    for precision, values in lowered.items():
        change = values["worst_change"]
        verdict = "passes" if values["passed"] else "FAILS"
        print(
            f"{precision}: {verdict} the gate (worst image AUROC change {change['auroc']:.4f} "
            f"<= {AUROC_GATE}, worst AU-sPRO@{SPRO_LIMIT} change {change['spro']:.4f} "
            f"<= {SPRO_GATE})"
        )
    if report["swap_step"] > AUROC_GATE:
        print(
            f"note: one swapped (good, anomalous) pair moves image AUROC by "
            f"{report['swap_step']:.4f} on this test split, more than the gate allows; "
            "a test split with more images judges 16-bit more fairly"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(v["passed"] for v in lowered.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
