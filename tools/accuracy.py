"""Accuracy benchmark: build every synthetic category for several seeds, tabulate mean ± std.

    python -m tools.accuracy                                  # 5 categories x seeds 0,1,2, cpu
    python -m tools.accuracy --tag mff --set logical.bottleneck_fusion=mff   # an ablation
    python -m tools.accuracy --fusion-variant sum:merge=sum          # the paper's fusion too

Each (category, seed) is generated with that seed into a cache folder (reused when present),
built at the preset with ``train.seed`` = the seed into a temporary artifact folder, and
measured per map branch: tie-correct image AUROC and AU-sPRO@0.05 on the logical, structural
and mean subsets, and image AUROC per defect type. Each ``--fusion-variant`` is another fusion
config calibrated and measured on the same builds' branch maps (column ``fused[NAME]``), a
paired comparison that costs no extra build. The tables go between markers into
``docs/ACCURACY.md`` (the rest of the file is kept) and the raw results into a JSON file beside
it. Bad options exit 2 before any work. After every build the finished ones are saved beside the
JSON (``accuracy.partial.json``), so an interrupted run (Ctrl-C exits 130 and leaves the
document and the JSON as they were) loses no finished build: the same command with ``--resume``
builds only the rest, and the file goes away once the results are written.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from engine.artifact import read_manifest
from engine.build import apply_overrides, resolve_device
from engine.calibrate import FusionConfig
from engine.cli import DEVICES, description, setup_logging
from engine.config import PRESETS, BuildConfig, resolve_preset
from engine.data.loco import LocoDataset
from engine.data.synthetic import CATEGORIES, GENERATOR_VERSION, generate_category
from engine.data.types import LOGICAL, STRUCTURAL
from engine.evaluation import summary as branch_summary
from engine.pipeline import BuildResult, build_category
from engine.preflight import check_index_kind, check_output_folder
from tools.accuracy_report import (
    partial_json,
    read_document,
    read_partial,
    render_block,
    results_json,
    update_document,
    write_atomic,
)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
REPO = Path(__file__).resolve().parents[1]
MAX_COUNT = 1000  # the generator's limit per folder (LOCO names have three digits)
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KINDS = {LOGICAL: "logical", STRUCTURAL: "structural"}


@dataclass(frozen=True)
class Plan:
    """Checked options: what to build, how, and where the results go."""

    categories: list[str]
    seeds: list[int]
    counts: dict[str, int]  # per folder, in the generator's order (see ``dataset_counts``)
    config: BuildConfig
    device: torch.device
    cache: Path
    out: Path
    json_path: Path
    tag: str | None
    keep: bool
    variants: dict[str, FusionConfig]
    resume: bool = False
    # the commit and settings the run started with: in the results' meta, and what a resumed
    # run must share with the interrupted one
    settings: dict = field(default_factory=dict)

    @property
    def partial_path(self) -> Path:
        """Where the finished builds of an unfinished run are kept."""
        return self.json_path.with_name(self.json_path.stem + ".partial.json")


# ---- options ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.accuracy", description=description(__doc__)
    )
    parser.add_argument("--categories", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated data+training seeds")
    parser.add_argument(
        "--n-train", type=int, default=150, help="training images (MVTec LOCO: 335-372)"
    )
    parser.add_argument("--n-validation", type=int, default=16, help="validation images")
    parser.add_argument("--n-test", type=int, default=100, help="good, logical, structural each")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config value"
    )
    parser.add_argument(
        "--fusion-variant",
        action="append",
        default=[],
        metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
        help="also measure the fused map with these fusion.* values (column fused[NAME])",
    )
    parser.add_argument("--tag", help="write into the named ablation section instead")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ACCURACY.md")
    parser.add_argument("--json", type=Path, help="raw results (default: beside --out)")
    parser.add_argument("--cache-dir", type=Path, help="synthetic data cache root")
    parser.add_argument("--keep", action="store_true", help="keep the built artifacts")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished builds of an interrupted run of the same command",
    )
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """Check every option and the output files; ValueError (or RuntimeError) names the problem."""
    categories = list(CATEGORIES) if args.categories == "all" else _names(args.categories)
    seeds = _seeds(args.seeds)
    for name, value, low in (
        ("--n-train", args.n_train, 1),
        ("--n-validation", args.n_validation, 1),
        ("--n-test", args.n_test, 1),
    ):
        if not low <= value <= MAX_COUNT:
            raise ValueError(f"{name} must be in {low}..{MAX_COUNT}, got {value}")
    if args.tag is not None and not TAG_PATTERN.fullmatch(args.tag):
        raise ValueError(f"--tag {args.tag!r}: use letters, digits, '_', '.', '-' (max 64)")
    if any(s.partition("=")[0].strip() == "train.seed" for s in args.set):
        raise ValueError("--set train.seed: the benchmark sets the training seed from --seeds")
    device = resolve_device(args.device)
    config = apply_overrides(resolve_preset(args.preset, device)[0], args.set)
    check_index_kind(config.structural.index, device)
    json_name = "accuracy.json" if args.tag is None else f"accuracy-{args.tag}.json"
    plan = Plan(
        categories=categories,
        seeds=seeds,
        counts=dataset_counts(args.n_train, args.n_validation, args.n_test),
        config=config,
        device=device,
        cache=args.cache_dir or default_cache(),
        out=args.out,
        json_path=args.json or args.out.with_name(json_name),
        tag=args.tag,
        keep=args.keep,
        variants=fusion_variants(config, args.fusion_variant),
        resume=args.resume,
        settings={
            "commit": git_commit(),
            "preset": args.preset,
            "device": str(device),
            "overrides": list(args.set),
            "fusion_variants": list(args.fusion_variant),
            "categories": categories,
            "seeds": seeds,
            "counts": dataset_counts(args.n_train, args.n_validation, args.n_test),
            "generator_version": GENERATOR_VERSION,
        },
    )
    for path, option in ((plan.out, "--out"), (plan.json_path, "--json")):
        if path.is_dir():
            raise ValueError(f"{option} {path}: is a folder, expected a file")
        check_output_folder(path.parent, option)
    try:
        update_document(read_document(plan.out), "", plan.tag)  # a file that would fail at the end
    except ValueError as error:
        raise ValueError(f"--out {plan.out}: {error}") from None
    if plan.partial_path.exists() and not plan.resume:
        raise ValueError(
            f"{plan.partial_path} holds the finished builds of an interrupted run: add --resume "
            "to continue it, or delete the file to start over"
        )
    return plan


def fusion_variants(config: BuildConfig, specs: Sequence[str]) -> dict[str, FusionConfig]:
    """``NAME:FIELD=VALUE[,FIELD=VALUE]`` specs -> name -> the config's fusion section with
    those ``fusion.FIELD`` values; ValueError names the bad spec."""
    variants = {}
    for spec in specs:
        name, sep, assignments = spec.partition(":")
        if not sep or not TAG_PATTERN.fullmatch(name) or not assignments.strip():
            raise ValueError(
                f"--fusion-variant {spec!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE], e.g. "
                "sum:merge=sum or max:merge=max,image_scale=branch "
                "(NAME: letters, digits, '_', '.', '-')"
            )
        if name in variants:
            raise ValueError(f"--fusion-variant {spec!r}: the name {name!r} is used twice")
        values = [f"fusion.{a.strip()}" for a in assignments.split(",")]
        try:
            variants[name] = apply_overrides(config, values).fusion
        except ValueError as error:
            raise ValueError(f"--fusion-variant {spec!r}: {error}") from None
    return variants


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in CATEGORIES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"--categories {text!r}: expected distinct names from {', '.join(CATEGORIES)}"
        )
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = [-1]
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def dataset_counts(n_train: int, n_validation: int, n_test: int) -> dict[str, int]:
    """Images per folder, named and ordered as the generator's readme lists them."""
    return {
        "train": n_train,
        "validation": n_validation,
        "test good": n_test,
        "test logical": n_test,
        "test structural": n_test,
    }


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "npgmf-engine" / "accuracy"


# ---- data and builds ----------------------------------------------------------------------


def ensure_dataset(plan: Plan, category: str, seed: int) -> Path:
    """The data root holding ``category`` generated with ``seed`` and the plan's counts.

    A cached folder is reused only if its readme names this generator version, seed and counts;
    otherwise it is generated again (deterministic from the seed, so reuse is safe).
    """
    root = plan.cache / f"seed{seed}"
    readme = root / category / "readme.txt"
    expected = [
        f"generator version {GENERATOR_VERSION})",
        f"seed {seed},",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in plan.counts.items()) + ".",
    ]
    if readme.is_file() and all(line in readme.read_text() for line in expected):
        return root
    print(f"[accuracy] generating {category} seed {seed} into {root}", flush=True)
    generate_category(
        root,
        category,
        seed=seed,
        n_train=plan.counts["train"],
        n_validation=plan.counts["validation"],
        n_test_good=plan.counts["test good"],
        n_logical=plan.counts["test logical"],
        n_structural=plan.counts["test structural"],
        progress=False,
        overwrite=True,
    )
    return root


def kept_diagnostics(artifact: Path) -> dict:
    """The logical collapse diagnostics of the epoch whose weights the artifact holds."""
    training = read_manifest(artifact, verify=False)["training"]
    kept = [d for d in training["diagnostics"] if d["epoch"] == training["best_epoch"]]
    if not kept:
        return {}
    levels = kept[0]["levels"]
    return {
        "epoch": training["best_epoch"],
        "ratio": {
            level: v["decoder_relative_std"] / max(v["encoder_relative_std"], 1e-12)
            for level, v in levels.items()
        },
        "collapsed_levels": kept[0]["collapsed_levels"],
    }


def build_record(
    result: BuildResult,
    dataset: LocoDataset,
    seed: int,
    seconds: float,
    calibrated: Sequence[str] = (),
) -> dict:
    """The JSON-ready raw result of one build (metrics per branch, per-image scores, the kept
    epoch's logical collapse diagnostics). ``calibrated``: the branches whose scores the
    fusion takes as they are (the composition branch with fine parts standardises its own)."""
    kinds = {
        defect: KINDS[sample.defect_type]
        for sample, defect in zip(dataset.samples("test"), result.test_defects, strict=True)
        if sample.defect_type in KINDS
    }
    return {
        "category": result.category,
        "seed": seed,
        "seconds": seconds,
        "step_seconds": dict(result.seconds),
        "metrics": {
            branch: branch_summary(metrics, result.image_scores[branch], result.test_defects)
            for branch, metrics in result.metrics.items()
        },
        "defect_kinds": kinds,
        "test_defects": list(result.test_defects),
        "image_scores": {b: s.tolist() for b, s in result.image_scores.items()},
        "validation_image_scores": {
            b: s.tolist() for b, s in result.validation_image_scores.items()
        },
        "logical_diagnostics": kept_diagnostics(result.artifact),
        "calibrated_branches": list(calibrated),
        "composition_windows": read_manifest(result.artifact, verify=False).get(
            "composition_windows"
        ),
    }


def run_builds(
    plan: Plan, work: Path, done: dict[tuple[str, int], dict], earlier: float
) -> list[dict]:
    """Generate (or reuse) and build each (category, seed) not in ``done``; one log line per
    build, and after each one every finished build saved to ``plan.partial_path`` with the wall
    time so far (``earlier`` seconds before this run)."""
    records = []
    total = len(plan.categories) * len(plan.seeds)
    started = time.perf_counter()
    for seed in plan.seeds:
        config = replace(plan.config, train=replace(plan.config.train, seed=seed))
        for category in plan.categories:
            if (category, seed) in done:
                records.append(done[category, seed])
                print(
                    f"[accuracy {len(records)}/{total}] {category} seed {seed}: "
                    f"kept from {plan.partial_path}",
                    flush=True,
                )
                continue
            root = ensure_dataset(plan, category, seed)
            out = work / f"{category}-seed{seed}"
            start = time.perf_counter()
            result = build_category(
                root,
                category,
                out,
                config,
                plan.device,
                progress=False,
                verbose=False,
                fusion_variants=plan.variants,
            )
            seconds = time.perf_counter() - start
            composition = config.composition
            grouped = composition.enabled and composition.groups_calibrated
            calibrated = ("composition",) if grouped else ()
            dataset = LocoDataset(root, category)
            records.append(build_record(result, dataset, seed, seconds, calibrated))
            means = ", ".join(
                f"{branch} {m.auroc_tie_correct['mean']:.3f}"
                for branch, m in result.metrics.items()
            )
            print(
                f"[accuracy {len(records)}/{total}] {category} seed {seed}: "
                f"mean image AUROC {means}; {seconds:.0f} s",
                flush=True,
            )
            wall = earlier + time.perf_counter() - started
            write_atomic(plan.partial_path, partial_json(records, plan.settings, wall, plan.tag))
            if not plan.keep:
                shutil.rmtree(out, ignore_errors=True)
    return records


def finished_builds(plan: Plan) -> tuple[dict[tuple[str, int], dict], float]:
    """With ``--resume``: the interrupted run's finished builds by (category, seed) and the wall
    time they took (nothing to resume: none); ValueError when it had other code or settings."""
    if plan.resume and plan.partial_path.exists():
        done, wall = read_partial(plan.partial_path, plan.settings)
        print(
            f"[accuracy] resuming: {len(done)} finished builds in {plan.partial_path}", flush=True
        )
        return done, wall
    if plan.resume:
        print(f"[accuracy] nothing to resume in {plan.partial_path}", flush=True)
    return {}, 0.0


def write_results(plan: Plan, records: Sequence[dict], meta: dict) -> None:
    """The JSON first (so a document that went bad meanwhile loses no results), then the doc."""
    write_atomic(plan.json_path, results_json(records, meta, plan.tag))
    try:
        document = update_document(
            read_document(plan.out), render_block(records, meta, plan.tag), plan.tag
        )
    except ValueError as error:
        raise ValueError(f"{plan.out}: {error}; the results are in {plan.json_path}") from None
    write_atomic(plan.out, document)


# ---- run facts and the entry point --------------------------------------------------------


def machine() -> str:
    """CPU model and core count, from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    models = re.findall(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    model = models[0].strip() if models else platform.processor() or platform.machine()
    cores = len(re.findall(r"^processor\s*:", info, re.MULTILINE)) or os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return f"{model or 'unknown CPU'}, {cores} logical cores ({usable} usable)"


def git_commit(repo: Path = REPO) -> str:
    """Short HEAD commit, ``(dirty)`` when the work tree has changes or untracked files."""
    try:
        head, status = (
            subprocess.run(
                ["git", *command], cwd=repo, capture_output=True, text=True, check=True
            ).stdout.strip()
            for command in (["rev-parse", "--short=12", "HEAD"], ["status", "--porcelain"])
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (dirty)" if status else head


def run_meta(plan: Plan, argv: Sequence[str], wall: float) -> dict:
    """The run's facts: machine, date, command and wall time, and the settings (with the commit)
    taken when it started."""
    return {
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "tools.accuracy", *argv]),
        "wall_seconds": wall,
        **plan.settings,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup_logging()
    work: Path | None = None
    plan: Plan | None = None
    try:
        plan = make_plan(args)
        done, earlier = finished_builds(plan)
        work = Path(tempfile.mkdtemp(prefix="npgmf-accuracy-"))
        start = time.perf_counter()
        records = run_builds(plan, work, done, earlier)
        wall = earlier + time.perf_counter() - start
        write_results(plan, records, run_meta(plan, argv, wall))
        plan.partial_path.unlink(missing_ok=True)
    except KeyboardInterrupt:
        kept = ""
        if plan is not None and plan.partial_path.exists():
            kept = f"; the finished builds are in {plan.partial_path} (--resume continues)"
        print(f"\ninterrupted: {args.out} was not changed{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, RuntimeError, OSError) as error:
        print("\n".join([f"error: {error}", *getattr(error, "__notes__", [])]), file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if work is not None and args.keep:
            print(f"[accuracy] artifacts kept in {work}", flush=True)
        elif work is not None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[accuracy] wrote {plan.out} and {plan.json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
