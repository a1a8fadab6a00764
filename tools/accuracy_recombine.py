"""Fuse branch scores of different accuracy-benchmark runs on the same data, at image level.

    python -m tools.accuracy_recombine BASE.json --take composition=OTHER.json

Answers "what would the fused map score with this run's memory bank and that run's composition
branch?" without a build that does both. For every build (category, seed) that all the runs
hold, each branch's validation and test image scores come from BASE or from the run its
``--take`` names; they are calibrated on the validation scores and joined as a ``merge="max"``
fusion joins them (:func:`engine.max_merge.image_stats_from_scores`,
:func:`engine.max_merge.max_fuse_scores`: exact for the image scores of such a fusion). The
fusion settings are the ``cpu`` preset's unless ``--set fusion.FIELD=VALUE`` says otherwise;
the runs must have been built with a ``merge="max"`` fusion of those settings, and the table's
"base, recomputed" column shows that the recomputation reproduces BASE's own fused scores.
Prints Markdown: per build and on the mean, tie-correct image AUROC on the logical, structural
and mean subsets. AU-sPRO needs the maps themselves and is not recombined.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from engine.build import apply_overrides
from engine.calibrate import BRANCHES, BranchStats, FusionConfig
from engine.cli import description
from engine.config import cpu_build_preset
from engine.max_merge import image_stats_from_scores, max_fuse_scores
from engine.metrics import auroc
from tools.accuracy_report import markdown_table, read_builds

EXIT_BAD_INPUT = 2
SUBSETS = ("logical", "structural")


def fused_scores(sources: Mapping[str, dict], fusion: FusionConfig) -> np.ndarray:
    """Test image scores of the max fusion of each branch's scores from its source build."""
    validation = {
        b: [torch.tensor(build["validation_image_scores"][b], dtype=torch.float64)]
        for b, build in sources.items()
    }
    stats = image_stats_from_scores(validation, fusion.image_scale, fusion.composition_scale)
    # scores their build standardised already (composition fine parts): taken as they are
    stats |= {b: BranchStats(0.0, 1.0) for b, build in sources.items() if _as_is(build, b)}
    test = {
        b: torch.tensor(build["image_scores"][b], dtype=torch.float64)
        for b, build in sources.items()
    }
    weights = {b: fusion.weight(b) for b in sources}
    return max_fuse_scores(test, stats, weights, fusion.capped).numpy()


def _as_is(build: dict, branch: str) -> bool:
    return branch in build.get("calibrated_branches", ())


def subset_aurocs(build: dict, scores: np.ndarray) -> list[float]:
    """Image AUROC of good against each subset's images, then their mean."""
    defects = build["test_defects"]
    kinds = np.array([build["defect_kinds"].get(d, "good") for d in defects])
    good = scores[np.array([d == "good" for d in defects])]
    values = [auroc(good, scores[kinds == subset]) for subset in SUBSETS]
    return [*values, sum(values) / len(values)]


def recombine(
    base: dict[tuple[str, int], dict],
    takes: Mapping[str, dict[tuple[str, int], dict]],
    fusion: FusionConfig,
) -> str:
    """The Markdown table of the builds every run holds."""
    keys = sorted(set(base).intersection(*takes.values()), key=lambda k: (k[1], k[0]))
    if not keys:
        raise ValueError("the runs share no (category, seed) build")
    rows, columns = [], []
    for key in keys:
        build = base[key]
        branches = [b for b in BRANCHES if b in build["validation_image_scores"]]
        for name, run in takes.items():
            if run[key]["test_defects"] != build["test_defects"]:
                raise ValueError(f"{key[0]} seed {key[1]}: the runs' test images differ")
            if name not in run[key]["validation_image_scores"]:
                raise ValueError(f"{key[0]} seed {key[1]}: the run taken has no {name!r} scores")
        sources = {b: build for b in branches} | {b: run[key] for b, run in takes.items()}
        built = subset_aurocs(build, np.asarray(build["image_scores"]["fused"]))
        again = subset_aurocs(build, fused_scores({b: build for b in branches}, fusion))
        mixed = subset_aurocs(build, fused_scores(sources, fusion))
        columns.append([built, again, mixed])
        rows.append([key[0], str(key[1]), *(_triple(v) for v in (built, again, mixed))])
    mean = np.mean(columns, axis=0)
    rows.append(["**mean**", "", *(_triple(v) for v in mean)])
    head = ["category", "seed", "base fused", "base, recomputed", "recombined"]
    return markdown_table(head, rows, 2)


def _triple(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def fusion_config(overrides: Sequence[str]) -> FusionConfig:
    """The cpu preset's fusion with ``fusion.FIELD=VALUE`` overrides (as ``--set`` of a build)."""
    others = [item for item in overrides if not item.startswith("fusion.")]
    if others:
        raise ValueError(f"--set {others[0]!r}: only fusion.FIELD=VALUE applies here")
    fusion = apply_overrides(cpu_build_preset(), overrides).fusion
    if fusion.merge != "max":
        raise ValueError("image-level recombination is exact only for merge='max'")
    if fusion.background_quantile is not None:
        raise ValueError(
            "fusion.background_quantile is fitted on validation pixels, which the benchmark's "
            "JSON does not hold: recombine with --set fusion.background_quantile=none"
        )
    return fusion


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.accuracy_recombine", description=description(__doc__)
    )
    parser.add_argument("base", type=Path, help="accuracy JSON whose other branches are kept")
    parser.add_argument(
        "--take",
        action="append",
        default=[],
        metavar="BRANCH=RUN.json",
        help="take this branch's scores from another run (repeatable)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="fusion.FIELD=VALUE", dest="overrides"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        takes = {}
        for item in args.take:
            branch, _, path = item.partition("=")
            if branch not in BRANCHES or not path:
                raise ValueError(
                    f"--take {item!r}: expected BRANCH=RUN.json, BRANCH one of {BRANCHES}"
                )
            takes[branch] = read_builds(Path(path))
        if not takes:
            raise ValueError("nothing to recombine: give at least one --take BRANCH=RUN.json")
        print(recombine(read_builds(args.base), takes, fusion_config(args.overrides)))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
