"""Evaluate anomaly maps of one category's test images with the metrics its data allows.

    python -m tools.evaluate --data-root DIR --category NAME --maps MAPS --out OUT \\
        [--data-format auto] [--curve-max-distance 0.001] [--seed N] [--no-progress]
    python -m tools.evaluate --data-root DIR --artifact ARTIFACT --out OUT [--device cpu]

``MAPS`` holds ``<category>/test/<type>/<NNN>.tiff`` (the official layout); with ``--artifact``
the maps come from running the built engine (``engine.Runtime``) on the test images, and the
category defaults to the artifact's. ``--data-format`` as in ``engine.build`` (``auto`` detects
the layout). MVTec LOCO AD: ``OUT/metrics.json`` in the official format plus the tie-correct
AUROC; MVTec AD and folders with masks: image AUROC, pixel AUROC and AU-PRO@0.3 (exact PRO);
folders without masks: image AUROC. Prints a table. Data without anomalous test images, bad
maps, a bad dataset, an unusable ``--out`` or device, or a failed write (disk full) exit with
code 2 and a message, writing nothing.
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
from engine.data.formats import (
    DATA_FORMATS,
    NO_METRICS,
    CategoryDataset,
    evaluation_level,
    evaluation_plan,
    open_dataset,
)
from engine.data.images import read_rgb
from engine.data.types import DatasetError, Sample
from engine.metrics import (
    TestMetrics,
    format_table,
    iter_maps,
    make_evaluator,
    write_metrics_json,
)
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
    parser.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="auto",
        help="layout of DATA_ROOT/CATEGORY: loco, mvtec, folder, or auto: detect it (default)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--maps", type=Path, help="anomaly maps root folder")
    source.add_argument("--artifact", type=Path, help="an engine.build artifact folder")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device for --artifact")
    parser.add_argument("--out", type=Path, required=True, help="output folder for metrics.json")
    parser.add_argument(
        "--curve-max-distance",
        type=float,
        default=0.001,
        help="refinement resolution of the LOCO sPRO curve (official default 0.001)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the LOCO score sampling above 1e7 scores"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def maps_from_folder(dataset: CategoryDataset, maps_root: Path, progress: bool) -> MapSource:
    """The TIFF maps of the dataset's test images, checked and read one at a time."""
    samples = dataset.samples("test")
    shape = dataset.image_size("test")
    for sample, path, anomaly_map in iter_maps(maps_root, samples, shape, progress):
        yield sample, str(path), anomaly_map


def maps_from_artifact(dataset: CategoryDataset, runtime: Runtime, progress: bool) -> MapSource:
    """Maps of the dataset's test images computed by the deployed engine, one image at a time."""
    samples = dataset.samples("test")
    for sample in tqdm(samples, desc="engine maps", unit="img", disable=not progress):
        result = runtime(read_rgb(sample.image_path), color="rgb")
        yield sample, str(sample.image_path), result.anomaly_map


def check_evaluable(dataset: CategoryDataset) -> str:
    """The dataset's evaluation level; DatasetError when its test split allows no metric."""
    level = evaluation_level(dataset)
    if level == NO_METRICS:
        raise DatasetError(f"{dataset.path}: nothing to evaluate; {evaluation_plan(dataset)}")
    return level


def evaluate_category(
    dataset: CategoryDataset,
    maps: MapSource,
    curve_max_distance: float = 0.001,
    seed: int = 0,
    progress: bool = True,
) -> TestMetrics:
    """The metrics the data allows (LOCO, pixel or image level) of the maps of every test image
    of ``dataset``, from any map source."""
    evaluator = make_evaluator(check_evaluable(dataset))
    for sample, name, anomaly_map in maps:
        evaluator.add(anomaly_map, sample, dataset.ground_truth(sample), name)
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
            category = args.category or runtime.category
            dataset = open_dataset(args.data_root, category, args.data_format)
            maps = maps_from_artifact(dataset, runtime, progress)
        elif args.category is None:
            raise ValueError("--category is required with --maps")
        else:
            dataset = open_dataset(args.data_root, args.category, args.data_format)
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
