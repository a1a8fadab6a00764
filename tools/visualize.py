"""Plots of a built engine on its test split: ROC, sPRO–FPR curves and overlays (PNG).

    python -m tools.visualize --artifact artifacts/pushpins --out plots/pushpins [--data-root DIR]

Writes ``roc.png`` (image-level, per anomaly type), ``spro_fpr.png`` (per subset, the 0.05
integration limit marked) and three overlay sheets: ``false_alarms.png`` (highest-scoring good
images), ``misses.png`` (lowest-scoring anomalies) and ``detections.png`` (highest-scoring
anomalies), each image with its heat map and the ground-truth regions outlined.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from engine import overlay
from engine.artifact import ArtifactError
from engine.build import synthetic_root
from engine.cli import DEVICES, setup_logging
from engine.data.images import read_rgb
from engine.data.loco import LocoDataset
from engine.data.types import GOOD, LOGICAL, STRUCTURAL, Sample
from engine.metrics import LocoMetrics
from engine.preflight import check_output_folder
from engine.runtime import Runtime
from tools.evaluate import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    evaluate_category,
    maps_from_artifact,
)

LABELS = {LOGICAL: "logical", STRUCTURAL: "structural"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.visualize", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--artifact", type=Path, required=True, help="engine.build artifact")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument(
        "--data-root", type=Path, help="LOCO-layout data (default: the synthetic cache)"
    )
    parser.add_argument("--n", type=int, default=4, help="images per overlay sheet")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="inference device")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def plot_roc(metrics: LocoMetrics, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for kind, curve in metrics.roc_curves.items():
        auc = metrics.auroc_tie_correct[kind]
        ax.plot(curve.fpr, curve.tpr, label=f"{LABELS[kind]} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image-level ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spro(metrics: LocoMetrics, path: Path, limit: float = 0.3) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for kind, curve in metrics.spro_curves.items():
        au = metrics.auc_spro[kind].get(0.05)
        label = LABELS[kind] + ("" if au is None else f" (AU-sPRO@0.05 {au:.3f})")
        ax.plot(curve.fpr, curve.spro, label=label)
    ax.axvline(0.05, color="0.5", linestyle="--", linewidth=1)
    ax.set(xlim=(0, limit), ylim=(0, 1.02), xlabel="false positive rate", ylabel="mean sPRO")
    ax.set_title("sPRO vs FPR")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_score_histogram(
    scores: dict[str, np.ndarray], threshold: float, path: Path, bins: int = 30
) -> None:
    """Image scores of the good images and of each anomaly type, with the decision threshold:
    what the threshold rejects and misses at a glance."""
    present = {kind: np.asarray(v, dtype=float) for kind, v in scores.items() if len(v)}
    if not present:
        raise ValueError("no image scores to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.histogram_bin_edges(np.concatenate(list(present.values())), bins=bins)
    for kind, values in present.items():
        label = "good" if kind == GOOD else LABELS.get(kind, kind)
        ax.hist(values, bins=edges, alpha=0.5, label=f"{label} (n={values.size})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("image score (max of the fused map)")
    ax.set_ylabel("images")
    ax.set_title("test image scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def overlay_sheet(
    rt: Runtime, dataset: LocoDataset, samples: list[Sample], title: str, path: Path
) -> None:
    """Rows of (image, overlay) with ground-truth regions outlined in white."""
    fig, axes = plt.subplots(len(samples), 2, figsize=(7, 2.4 * len(samples)), squeeze=False)
    for row, sample in zip(axes, samples, strict=True):
        image = read_rgb(sample.image_path)
        result = rt(image, color="rgb")
        row[0].imshow(image)
        row[0].set_title(f"{sample.defect_type}/{sample.stem}", fontsize=8)
        row[1].imshow(overlay(image, result, color="rgb"))
        for channel in dataset.ground_truth(sample):
            row[1].contour(channel.mask, levels=[0.5], colors="white", linewidths=0.8)
        row[1].set_title(f"score {result.score:.2f} (threshold {rt.threshold:.2f})", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        if args.n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        check_output_folder(args.out, "--out")
        rt = Runtime.load(args.artifact, device=args.device)
        root = args.data_root or synthetic_root()
        dataset = LocoDataset(root, rt.category)
        progress = not args.no_progress
        metrics = evaluate_category(
            dataset, maps_from_artifact(dataset, rt, progress), progress=progress
        )
        written = write_plots(rt, dataset, metrics, args.out, args.n)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ArtifactError, ValueError, RuntimeError, OSError) as error:
        # DatasetError is a ValueError; RuntimeError: no CUDA device; OSError: disk full...
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


def write_plots(
    rt: Runtime, dataset: LocoDataset, metrics: LocoMetrics, out: Path, n: int
) -> list[str]:
    """The curves and the overlay sheets of ``n`` images each, into ``out``; the names written."""
    out.mkdir(parents=True, exist_ok=True)
    plot_roc(metrics, out / "roc.png")
    plot_spro(metrics, out / "spro_fpr.png")
    plot_score_histogram(metrics.image_scores, rt.threshold, out / "score_histogram.png")

    by_type = {
        kind: [s for s in dataset.samples("test") if s.defect_type == kind]
        for kind in (GOOD, LOGICAL, STRUCTURAL)
    }
    good = sorted(zip(metrics.image_scores[GOOD], by_type[GOOD]), key=lambda p: -p[0])
    anomalies = sorted(
        (
            pair
            for kind in (LOGICAL, STRUCTURAL)
            for pair in zip(metrics.image_scores[kind], by_type[kind])
        ),
        key=lambda p: p[0],
    )
    sheets = {
        "false_alarms.png": ("highest-scoring good images", [s for _, s in good[:n]]),
        "misses.png": ("lowest-scoring anomalies", [s for _, s in anomalies[:n]]),
        "detections.png": ("highest-scoring anomalies", [s for _, s in anomalies[::-1][:n]]),
    }
    written = ["roc.png", "spro_fpr.png", "score_histogram.png"]
    for name, (title, samples) in sheets.items():
        if samples:
            overlay_sheet(rt, dataset, samples, title, out / name)
            written.append(name)
    return written


if __name__ == "__main__":
    sys.exit(main())
