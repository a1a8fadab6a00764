"""Plots of a built engine on its test split: ROC, localisation curve, score histogram and
overlays (PNG).

    python -m tools.visualize --artifact artifacts/pushpins --out plots/pushpins [--data-root DIR]
    python -m tools.visualize --artifact artifacts/bracket --out plots/ --data-root line3

Writes ``roc.png`` (image-level, per anomaly type, when the test split has good images), the
localisation curve the data allows: ``spro_fpr.png`` (MVTec LOCO AD, per subset, the 0.05
integration limit marked) or ``pro_fpr.png`` (MVTec AD and folders with masks, the 0.3 limit
marked), ``score_histogram.png`` (good vs each anomaly type, the threshold line) and three overlay
sheets: ``false_alarms.png`` (highest-scoring good images), ``misses.png`` (lowest-scoring
anomalies) and ``detections.png`` (highest-scoring anomalies), each image with its heat map and
the ground-truth regions outlined where there are masks. ``--data-format`` as in
``engine.build``; data without anomalous test images has nothing to plot (exit 2).
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
from engine.data.formats import DATA_FORMATS, CategoryDataset, open_dataset
from engine.data.images import read_rgb
from engine.data.types import GOOD, LOGICAL, STRUCTURAL, Sample
from engine.metrics import LocoMetrics, MVTecMetrics, TestMetrics, auroc, roc_curve
from engine.preflight import check_output_folder
from engine.runtime import Runtime
from tools.evaluate import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    MapSource,
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
        "--data-root",
        type=Path,
        help="folder holding the artifact's category (default: the synthetic cache)",
    )
    parser.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="auto",
        help="layout of DATA_ROOT/CATEGORY: loco, mvtec, folder, or auto: detect it (default)",
    )
    parser.add_argument("--n", type=int, default=4, help="images per overlay sheet")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="inference device")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def plot_roc(good: np.ndarray, anomalies: dict[str, np.ndarray], path: Path) -> None:
    """Tie-correct image-level ROC of the good test images' scores (N,) against each anomaly
    type's (M,)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for kind, scores in anomalies.items():
        fpr, tpr = roc_curve(good, scores)
        label = f"{LABELS.get(kind, kind)} (AUROC {auroc(good, scores):.3f})"
        ax.plot(fpr, tpr, label=label)
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


def plot_pro(metrics: MVTecMetrics, path: Path) -> None:
    """PRO against the false-positive rate of defect-free pixels, the integration limit marked."""
    assert metrics.pro_curve is not None
    limit = metrics.integration_limit
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    label = f"AU-PRO@{limit:g} {metrics.au_pro:.3f}"
    ax.plot(metrics.pro_curve.fpr, metrics.pro_curve.pro, label=label)
    ax.axvline(limit, color="0.5", linestyle="--", linewidth=1)
    ax.set(xlim=(0, min(1.0, 2 * limit)), ylim=(0, 1.02))
    ax.set(xlabel="false positive rate (pixels)", ylabel="per-region overlap (PRO)")
    ax.set_title("PRO vs FPR")
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
    rt: Runtime, dataset: CategoryDataset, samples: list[Sample], title: str, path: Path
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
        dataset = open_dataset(root, rt.category, args.data_format)
        progress = not args.no_progress
        scores: list[float] = []
        maps = _recording_scores(maps_from_artifact(dataset, rt, progress), scores)
        metrics = evaluate_category(dataset, maps, progress=progress)
        written = write_plots(rt, dataset, metrics, scores, args.out, args.n)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ArtifactError, ValueError, RuntimeError, OSError) as error:
        # DatasetError is a ValueError; RuntimeError: no CUDA device; OSError: disk full...
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


def _recording_scores(maps: MapSource, scores: list[float]) -> MapSource:
    """``maps`` unchanged, each map's image score (its max) appended to ``scores`` on the way."""
    for sample, name, anomaly_map in maps:
        scores.append(float(anomaly_map.max()))
        yield sample, name, anomaly_map


def write_plots(
    rt: Runtime,
    dataset: CategoryDataset,
    metrics: TestMetrics,
    scores: list[float],
    out: Path,
    n: int,
) -> list[str]:
    """The curves the metrics allow, the score histogram and the overlay sheets of ``n`` images
    each, into ``out``; the names written. ``scores`` (N,): the test images' image scores."""
    out.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[tuple[float, Sample]]] = {}
    for score, sample in zip(scores, dataset.samples("test"), strict=True):
        by_type.setdefault(sample.defect_type, []).append((score, sample))
    good = sorted(by_type.pop(GOOD, []), key=lambda p: -p[0])
    good_scores = np.array([score for score, _ in good])
    type_scores = {kind: np.array([score for score, _ in pairs]) for kind, pairs in by_type.items()}
    written = []
    if good:
        plot_roc(good_scores, type_scores, out / "roc.png")
        written.append("roc.png")
    if isinstance(metrics, LocoMetrics):
        plot_spro(metrics, out / "spro_fpr.png")
        written.append("spro_fpr.png")
    elif isinstance(metrics, MVTecMetrics) and metrics.pro_curve is not None:
        plot_pro(metrics, out / "pro_fpr.png")
        written.append("pro_fpr.png")
    histogram = {GOOD: good_scores, **type_scores}
    plot_score_histogram(histogram, rt.threshold, out / "score_histogram.png")
    written.append("score_histogram.png")

    anomalies = sorted((pair for pairs in by_type.values() for pair in pairs), key=lambda p: p[0])
    sheets = {
        "false_alarms.png": ("highest-scoring good images", [s for _, s in good[:n]]),
        "misses.png": ("lowest-scoring anomalies", [s for _, s in anomalies[:n]]),
        "detections.png": ("highest-scoring anomalies", [s for _, s in anomalies[::-1][:n]]),
    }
    for name, (title, samples) in sheets.items():
        if samples:
            overlay_sheet(rt, dataset, samples, title, out / name)
            written.append(name)
    return written


if __name__ == "__main__":
    sys.exit(main())
