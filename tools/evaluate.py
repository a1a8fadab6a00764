"""Evaluate anomaly maps of one MVTec LOCO AD category with the official metric.

    python -m tools.evaluate --data-root DIR --category NAME --maps MAPS --out OUT \\
        [--curve-max-distance 0.001] [--seed N] [--no-progress]
    python -m tools.evaluate --data-root DIR --artifact ARTIFACT --out OUT [--device cpu]

``MAPS`` holds ``<category>/test/<type>/<NNN>.tiff`` (the official layout); with ``--artifact``
the maps come from running the built engine (``engine.Runtime``) on the test images, and the
category defaults to the artifact's. Writes
``OUT/metrics.json`` (official format plus the tie-correct AUROC) and prints a table. Bad maps,
a bad dataset, an unusable ``--out`` or device, or a failed write (disk full) exit with code 2
and a message, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.artifact import ArtifactError
from engine.cli import DEVICES, setup_logging
from engine.data.images import read_rgb
from engine.data.loco import LocoDataset
from engine.data.types import Sample
from engine.metrics import LocoEvaluator, LocoMetrics, format_table, iter_maps, write_metrics_json
from engine.preflight import check_output_folder
from engine.runtime import Runtime

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

MapSource = Iterable[tuple[Sample, str, np.ndarray]]
"""(sample, name used in error messages, (H, W) map) per test image."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data-root", type=Path, required=True, help="folder of categories")
    parser.add_argument("--category", help="category folder name (default: the artifact's)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--maps", type=Path, help="anomaly maps root folder")
    source.add_argument("--artifact", type=Path, help="an engine.build artifact folder")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device for --artifact")
    parser.add_argument("--out", type=Path, required=True, help="output folder for metrics.json")
    parser.add_argument(
        "--curve-max-distance",
        type=float,
        default=0.001,
        help="refinement resolution of the sPRO curve (official default 0.001)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the score sampling above 1e7 scores"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def maps_from_folder(dataset: LocoDataset, maps_root: Path, progress: bool) -> MapSource:
    """The TIFF maps of the dataset's test images, checked and read one at a time."""
    samples = dataset.samples("test")
    shape = dataset.image_size("test")
    for sample, path, anomaly_map in iter_maps(maps_root, samples, shape, progress):
        yield sample, str(path), anomaly_map


def maps_from_artifact(dataset: LocoDataset, runtime: Runtime, progress: bool) -> MapSource:
    """Maps of the dataset's test images computed by the deployed engine, one image at a time."""
    samples = dataset.samples("test")
    for sample in tqdm(samples, desc="engine maps", unit="img", disable=not progress):
        result = runtime(read_rgb(sample.image_path), color="rgb")
        yield sample, str(sample.image_path), result.anomaly_map


def evaluate_category(
    dataset: LocoDataset,
    maps: MapSource,
    curve_max_distance: float = 0.001,
    seed: int = 0,
    progress: bool = True,
) -> LocoMetrics:
    """LOCO metrics of the maps of every test image of ``dataset``, from any map source."""
    evaluator = LocoEvaluator()
    for sample, name, anomaly_map in maps:
        evaluator.add(anomaly_map, sample.defect_type, dataset.ground_truth(sample), name)
    expected = len(dataset.samples("test"))
    if evaluator.num_images != expected:
        raise ValueError(f"got maps for {evaluator.num_images} test images, expected {expected}")
    return evaluator.compute(curve_max_distance=curve_max_distance, seed=seed, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    progress = not args.no_progress
    try:
        check_output_folder(args.out, "--out")
        if args.artifact is not None:
            runtime = Runtime.load(args.artifact, device=args.device)
            dataset = LocoDataset(args.data_root, args.category or runtime.category)
            maps = maps_from_artifact(dataset, runtime, progress)
        elif args.category is None:
            raise ValueError("--category is required with --maps")
        else:
            dataset = LocoDataset(args.data_root, args.category)
            maps = maps_from_folder(dataset, args.maps, progress)
        metrics = evaluate_category(dataset, maps, args.curve_max_distance, args.seed, progress)
        path = write_metrics_json(metrics, args.out)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, ArtifactError, RuntimeError, OSError) as error:
        # DatasetError is a ValueError; RuntimeError: no CUDA device; OSError: disk full...
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(metrics))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
