"""``python -m engine.build``: train, calibrate, evaluate and export NPGMF, category by category.

    python -m engine.build --category pushpins
    python -m engine.build --category all --data-root /data/mvtec_loco --preset paper
    python -m engine.build --data-format folder --data-root line3 --category bracket

``--data-format`` names the layout of ``DATA_ROOT/CATEGORY``: ``loco`` (MVTec LOCO AD), ``mvtec``
(MVTec AD), ``folder`` (good/ and optional validation/, bad/, masks/), or ``auto`` (the default),
which detects it and says which. What the test images can evaluate (LOCO metrics, pixel-level,
image-level or nothing) is decided from the data before training; the artifact is written
either way. Without ``--data-root`` (and without ``$MVTEC_LOCO_ROOT``) the synthetic LOCO-style
dataset is generated once into a cache folder and used. Any setting of :class:`engine.config.BuildConfig`
can be overridden with ``--set section.field=value`` (e.g. ``--set train.lr=1e-3``).

Every option is checked before any work starts (values converted to their field's type, output
folders that may be written, the kNN index); expected failures print a message and exit 2.

Settings apply in this order: the preset, then ``--config FILE`` (a JSON object in the format
``--print-config`` prints; fields it leaves out keep the preset's values), then the options
``--epochs``, ``--seed``, ``--weights``, ``--text-prior``, ``--target-far``, then every ``--set``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.cli import DEVICES, description, setup_logging
from engine.config import PRESETS, BuildConfig, field_types, parse_value, resolve_preset
from engine.data.formats import (
    DATA_FORMATS,
    IMAGE_LEVEL,
    LOCO_LEVEL,
    PIXEL_LEVEL,
    list_categories,
)
from engine.data.loco import check_category_name
from engine.data.synthetic import CATEGORIES, GENERATOR_VERSION, generate_category
from engine.data.types import GOOD, LOGICAL, STRUCTURAL, DatasetError
from engine.evaluation import FUSED
from engine.metrics import LocoMetrics, TestMetrics, metric_cells
from engine.metrics.auroc import auroc_standard_error
from engine.operating_point import operating_point_lines
from engine.pipeline import BuildResult, build_category
from engine.preflight import check_index_kind, check_outputs

log = logging.getLogger("engine.build")  # not __name__: "__main__" under -m

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
SYNTHETIC_SEED = 0


def synthetic_root(cache_dir: Path | None = None) -> Path:
    """Where the build generates (and later finds) the synthetic dataset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    cache = cache_dir or Path(base) / "npgmf-engine"
    # Versioned: a cache made by an older generator is never mistaken for today's data.
    return cache / f"synthetic-v{GENERATOR_VERSION}-seed{SYNTHETIC_SEED}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.build", description=description(__doc__)
    )
    parser.add_argument("--category", help="category folder name, or 'all' (required to build)")
    parser.add_argument(
        "--data-root",
        type=Path,
        help="folder holding the category folders (default: $MVTEC_LOCO_ROOT, else synthetic "
        "LOCO-style data)",
    )
    parser.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="auto",
        help="layout of DATA_ROOT/CATEGORY: loco (MVTec LOCO AD), mvtec (MVTec AD), folder "
        "(good/ with optional validation/, bad/, masks/), or auto: detect it and say which "
        "(default)",
    )
    parser.add_argument("--out", type=Path, help="artifact folder (default artifacts/<category>)")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="auto",
        help="paper: the paper's models and settings; cpu: small models that train in minutes "
        "on a CPU; auto: paper on CUDA with the paper's weights present, else cpu (default)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="training and inference device (default: cuda when present)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="JSON settings file, the format --print-config prints (may hold only some fields)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings as JSON and exit without building",
    )
    parser.add_argument("--save-maps", type=Path, help="write fused float32 TIFF maps here")
    parser.add_argument(
        "--target-far",
        type=float,
        help="share of good parts the threshold may reject (fusion.target_false_alarm_rate, "
        "default 0.05); change it later without a rebuild with python -m tools.threshold",
    )
    parser.add_argument("--epochs", type=int, help="training epochs (overrides the preset)")
    parser.add_argument("--seed", type=int, help="training seed (overrides the preset)")
    parser.add_argument(
        "--weights",
        help="backbone weights: auto | imagenet | random | FILE (default: auto)",
    )
    parser.add_argument(
        "--text-prior", choices=("auto", "clip", "minilm", "learned"), help="category prior"
    )
    parser.add_argument("--clip-checkpoint", help="local open_clip checkpoint for --text-prior")
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="permit --weights random (tests and timing only: the results are meaningless)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config value, e.g. --set logical.image_size=64; the value must fit "
        "the field's type (numbers, true/false, comma-separated lists, null)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the training checkpoints of an earlier, interrupted build and start over",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="synthetic data cache")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.category is None and not args.print_config:
        parser.error("the following arguments are required: --category")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_overrides(config: BuildConfig, assignments: Sequence[str]) -> BuildConfig:
    """``section.field=value`` (or top-level ``field=value``) assignments, each value converted
    to its field's declared type (:func:`engine.config.parse_value`); ValueError names the field
    and the type expected."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {assignment!r}")
        config = _set_path(config, key.split("."), raw, key)
    return config


def _set_path(obj: Any, path: list[str], raw: str, key: str) -> Any:
    names = {f.name for f in fields(obj)}
    if path[0] not in names:
        raise ValueError(f"--set {key}: {type(obj).__name__} has no field {path[0]!r}")
    if len(path) == 1:
        if is_dataclass(getattr(obj, path[0])):
            raise ValueError(f"--set {key}: {path[0]!r} is a section; name one of its fields")
        try:
            value = parse_value(field_types(type(obj))[path[0]], raw, key)
        except ValueError as error:
            raise ValueError(f"--set {key}={raw}: {error}") from None
        return replace(obj, **{path[0]: value})
    child = getattr(obj, path[0])
    if not is_dataclass(child):
        raise ValueError(f"--set {key}: {path[0]!r} is not a section")
    return replace(obj, **{path[0]: _set_path(child, path[1:], raw, key)})


def read_config_file(path: Path, base: BuildConfig) -> BuildConfig:
    """``base`` with the fields of the JSON object in ``path`` replaced (ValueError names the
    file and the field)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: not a JSON file ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object, got {type(values).__name__}")
    try:
        return BuildConfig.from_dict(_merged(base.to_dict(), values))
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config {path}: {error}") from None


def _merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied, nested objects merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value) if nested else value
    return out


def build_config(args: argparse.Namespace, device: torch.device) -> tuple[BuildConfig, str]:
    """The resolved configuration (see the module docstring for the order) and why the preset
    was chosen."""
    config, why = resolve_preset(args.preset, device)
    if args.config is not None:
        config = read_config_file(args.config, config)
    top: dict[str, Any] = {}
    if args.weights is not None:
        top["weights"] = args.weights
    if args.allow_random_weights:
        top["allow_random"] = True
    if args.text_prior is not None:
        top["text_prior"] = args.text_prior
    if args.clip_checkpoint is not None:
        top["clip_checkpoint"] = args.clip_checkpoint
    train: dict[str, Any] = {}
    if args.epochs is not None:
        train["epochs"] = args.epochs
        train["steps"] = None  # an explicit epoch count wins over the preset's step budget
    if args.seed is not None:
        train["seed"] = args.seed
    if args.target_far is not None:
        top["fusion"] = replace(config.fusion, target_false_alarm_rate=args.target_far)
    config = replace(config, train=replace(config.train, **train), **top)
    return apply_overrides(config, args.set), why


def find_categories(args: argparse.Namespace) -> tuple[Path, list[str], bool]:
    """The data root, the categories to build, and whether the root is the synthetic cache.

    Only lists folders: nothing is generated here (see :func:`generate_synthetic`).
    """
    root = args.data_root or (
        Path(os.environ["MVTEC_LOCO_ROOT"]) if os.environ.get("MVTEC_LOCO_ROOT") else None
    )
    if root is not None:
        if not root.is_dir():
            raise DatasetError(f"{root}: data root folder does not exist")
        if args.category != "all":
            return root, [check_category_name(args.category)], False
        found = list_categories(root, args.data_format)
        if not found:
            raise DatasetError(
                f"{root}: no category folders found (--data-format {args.data_format})"
            )
        return root, found, False
    if args.data_format not in ("auto", "loco"):
        raise ValueError(
            f"--data-format {args.data_format} needs --data-root (the synthetic data is in the "
            "MVTec LOCO AD layout)"
        )

    names = list(CATEGORIES) if args.category == "all" else [check_category_name(args.category)]
    for name in names:
        if name not in CATEGORIES:
            raise DatasetError(
                f"no --data-root given, and {name!r} is not a synthetic category "
                f"{tuple(CATEGORIES)}; pass --data-root (or set MVTEC_LOCO_ROOT) for real data"
            )
    return synthetic_root(args.cache_dir), names, True


def generate_synthetic(cache: Path, names: Sequence[str], progress: bool) -> None:
    """Generate the synthetic categories missing from ``cache``."""
    for name in names:
        if not (cache / name).is_dir():
            log.info("generating the synthetic %s dataset into %s", name, cache)
            generate_category(cache, name, seed=SYNTHETIC_SEED, progress=progress)
    log.info("synthetic LOCO-style data from %s (no --data-root given)", cache)


MAP_LEGEND = "map: the branch scored alone, or the fused map"
LEGENDS = {
    LOCO_LEVEL: f"{MAP_LEGEND}; log / struct / mean: the logical-anomaly and structural-anomaly "
    "test images (each against the good ones) and their mean",
    PIXEL_LEVEL: f"{MAP_LEGEND}; AU-PRO@0.3: area under the per-region overlap curve up to 30 % "
    "false-positive pixels, normalised (exact MVTec AD PRO)",
    IMAGE_LEVEL: f"{MAP_LEGEND}; image-level metrics only: the anomalous images have no masks",
}
NO_METRICS_NOTE = "no test metrics: the test split holds no anomalous image"
LOCO_KEYS = ("logical_anomalies", "structural_anomalies", "mean")
LOCO_HEAD = ["AUROC log", "struct", "mean", "sPRO@.05 log", "struct", "mean"]


def _metric_row(metrics: TestMetrics) -> tuple[list[str], list[float | None]]:
    """Column headers and values of one branch's metrics (LOCO or another level)."""
    if isinstance(metrics, LocoMetrics):
        values = [metrics.auroc[k] for k in LOCO_KEYS]
        return LOCO_HEAD, values + [metrics.auc_spro[k][0.05] for k in LOCO_KEYS]
    cells = metric_cells(metrics)
    return list(cells), list(cells.values())


def _metric_table(results: Sequence[BuildResult]) -> list[str]:
    """One aligned table of the branches' metrics of ``results`` (all of one level)."""
    rows: list[list[str]] = []
    for result in results:
        for branch, m in result.metrics.items():
            head, values = _metric_row(m)
            cells = ["-" if v is None else f"{v:.3f}" for v in values]
            rows.append([result.category, branch, *cells])
    rows.insert(0, ["category", "map", *head])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def noise_line(metrics: TestMetrics) -> str | None:
    """How far the fused mean image AUROC of a LOCO test set moves by sampling alone (one
    standard error), so that small differences between rows are not read as results; None
    when the test set does not define it."""
    if not isinstance(metrics, LocoMetrics):
        return None
    counts = {kind: len(metrics.image_scores.get(kind, ())) for kind in (GOOD, LOGICAL, STRUCTURAL)}
    areas = {kind: metrics.auroc_tie_correct.get(kind) for kind in (LOGICAL, STRUCTURAL)}
    errors = [
        auroc_standard_error(area, counts[GOOD], counts[kind])
        for kind, area in areas.items()
        if area is not None
    ]
    if not errors:
        return None
    # The subsets share their good images, so their errors are correlated: the mean's error lies
    # between the independent value and the errors' average, which is printed (the larger).
    error = sum(errors) / len(errors)
    return (
        f"fused mean AUROC sampling error about ±{error:.3f} (one standard error, "
        f"Hanley-McNeil; {counts[GOOD]} good, {counts[LOGICAL]} logical, {counts[STRUCTURAL]} "
        "structural test images): closer rows are not told apart by this test set "
        "(docs/ACCURACY.md: the multi-seed benchmark)"
    )


def result_table(results: Sequence[BuildResult], target_far: float) -> str:
    """The metrics per branch, one table with its legend per evaluation level (LOCO: image
    AUROC and AU-sPRO@0.05 per subset), step times, and what the threshold does on the test
    images."""
    lines: list[str] = []
    for level, legend in LEGENDS.items():
        chosen = [r for r in results if r.evaluation_level == level and r.metrics]
        if chosen:
            lines += [*_metric_table(chosen), legend]
    for result in results:
        if not result.metrics:
            lines.append(f"{result.category}: {NO_METRICS_NOTE}")
        steps = ", ".join(f"{name} {s:.1f}s" for name, s in result.seconds.items())
        lines.append(f"{result.category}: {steps}; total {sum(result.seconds.values()):.1f}s")
        lines.append(f"{result.category}: artifact {result.artifact}")
        noise = noise_line(result.metrics[FUSED]) if FUSED in result.metrics else None
        if noise is not None:
            lines.append(f"{result.category}: {noise}")
        scores = result.image_scores.get(FUSED, np.empty(0))
        first, *rest = operating_point_lines(
            scores, result.test_defects, result.threshold, target_far
        )
        lines += [f"{result.category}: {first}", *rest]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    progress = not args.no_progress
    try:
        if args.category == "all" and args.out is not None:
            raise ValueError("--out names one artifact; with --category all omit it")
        device = resolve_device(args.device)
        config, why = build_config(args, device)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        log.info("config: %s", why)
        root, categories, synthetic = find_categories(args)
        outs = {category: args.out or Path("artifacts") / category for category in categories}
        # Everything that can fail without data or a model fails here, before any work.
        for out in outs.values():
            check_outputs(out, args.save_maps)
        check_index_kind(config.structural.index, device)
        if synthetic:
            generate_synthetic(root, categories, progress)
        results = [
            build_category(
                root,
                c,
                outs[c],
                config,
                device,
                args.save_maps,
                progress,
                fresh=args.fresh,
                data_format=args.data_format,
            )
            for c in categories
        ]
    except KeyboardInterrupt as interrupt:
        print(
            "\ninterrupted: no artifact was written for the category in progress; training "
            "checkpoints are kept and a rerun of the same command resumes",
            *getattr(interrupt, "__notes__", []),
            sep="\n",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (ValueError, RuntimeError, OSError) as error:
        # DatasetError is a ValueError, ArtifactError a RuntimeError; OSError: disk full,
        # permissions, a path that is a file...
        print(error_message(error), file=sys.stderr)
        return EXIT_BAD_INPUT
    print()
    print(result_table(results, config.fusion.target_false_alarm_rate))
    return 0


def error_message(error: BaseException) -> str:
    """``error: ...`` with the notes the steps added (e.g. which partial outputs were removed)."""
    return "\n".join([f"error: {error}", *getattr(error, "__notes__", [])])


if __name__ == "__main__":
    sys.exit(main())
