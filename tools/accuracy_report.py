"""The accuracy benchmark's report: Markdown tables over seeds and the marker-kept document.

A *record* is one build's JSON-ready result (see ``tools.accuracy.build_record``): ``category``,
``seed``, ``seconds``, ``metrics[branch]`` as :func:`engine.pipeline.summary` gives it,
``defect_kinds`` (defect name -> ``logical``/``structural``) and ``test_defects``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.atomic import atomic_file

SUBSETS = (
    ("logical_anomalies", "logical"),
    ("structural_anomalies", "structural"),
    ("mean", "mean"),
)
METRICS = (("image_auroc_tie_correct", "Image AUROC"), ("au_spro_0.05", "AU-sPRO@0.05"))
IMAGE_AUROC_PER_DEFECT = "image_auroc_per_defect"
SPRO_PER_DEFECT = "au_spro_0.05_per_defect"
SUBSET_OF_KIND = {"logical": "logical_anomalies", "structural": "structural_anomalies"}
NEW_DOCUMENT = """# Accuracy benchmark

`python -m tools.accuracy` builds every synthetic category for several seeds and measures each
map branch. The parts between `<!-- accuracy:... -->` markers are generated; the rest of this
file is kept as written. The full benchmark (roughly an hour on 2 cores):

    python -m tools.accuracy

<!-- accuracy:begin -->
<!-- accuracy:end -->

## Ablations

Each ablation is a tagged run, e.g. `python -m tools.accuracy --tag mff --set
logical.bottleneck_fusion=mff`; its tables go into a section of their own below.
"""


# ---- tables -------------------------------------------------------------------------------


def cell(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± std`` (sample std, n - 1) of per-seed values; the value alone for one seed;
    ``–`` when there is none or any is missing (a partial mean would not compare)."""
    if not values or any(value is None for value in values):
        return "–"
    array = np.asarray(values, dtype=np.float64)
    if array.size == 1:
        return f"{array[0]:.{digits}f}"
    return f"{array.mean():.{digits}f} ± {array.std(ddof=1):.{digits}f}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    """A GitHub table; the first ``text_columns`` columns left-aligned, the rest right."""
    rule = ["---" if i < text_columns else "---:" for i in range(len(head))]
    lines = [head, rule, *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def _value(record: dict | None, branch: str, metric: str, key: str) -> float | None:
    if record is None:
        return None
    return record["metrics"].get(branch, {}).get(metric, {}).get(key)


def branches_of(records: Sequence[dict]) -> list[str]:
    """Every branch measured, in the order the builds report them."""
    return list(dict.fromkeys(branch for r in records for branch in r["metrics"]))


def category_table(records: Sequence[dict], metric: str, key: str) -> str:
    """Rows: each category, then **overall**; columns: branches; cells over seeds.

    Overall: per seed the mean over categories (missing if any category misses), then a cell.
    """
    seeds = sorted({r["seed"] for r in records})
    categories = list(dict.fromkeys(r["category"] for r in records))
    index = {(r["category"], r["seed"]): r for r in records}
    branches = branches_of(records)
    rows = []
    for category in categories:
        rows.append(
            [category]
            + [
                cell([_value(index.get((category, s)), b, metric, key) for s in seeds])
                for b in branches
            ]
        )
    overall = []
    for branch in branches:
        per_seed = []
        for seed in seeds:
            values = [_value(index.get((c, seed)), branch, metric, key) for c in categories]
            per_seed.append(None if None in values else float(np.mean(values)))
        overall.append(cell(per_seed))
    rows.append(["**overall**", *overall])
    return markdown_table(["category", *branches], rows, 1)


def _defect_value(
    record: dict | None, branch: str, metric: str, defect: str, kind: str
) -> float | None:
    """``metric`` of one defect type in one build: keyed by defect, or for
    :data:`SPRO_PER_DEFECT` by subset and then defect (None where not measured)."""
    if metric != SPRO_PER_DEFECT:
        return _value(record, branch, metric, defect)
    by_defect = _value(record, branch, metric, SUBSET_OF_KIND[kind])
    return None if by_defect is None else by_defect.get(defect)


def defect_table(records: Sequence[dict], metric: str = IMAGE_AUROC_PER_DEFECT) -> str:
    """``metric`` (:data:`IMAGE_AUROC_PER_DEFECT` or :data:`SPRO_PER_DEFECT`) of each defect
    type: rows (category, type), columns branches."""
    seeds = sorted({r["seed"] for r in records})
    index = {(r["category"], r["seed"]): r for r in records}
    branches = branches_of(records)
    rows = []
    for category in dict.fromkeys(r["category"] for r in records):
        builds = [index.get((category, s)) for s in seeds]
        kinds: dict[str, str] = {}
        for build in filter(None, builds):
            kinds.update(build["defect_kinds"])
        for defect in sorted(kinds, key=lambda name: (kinds[name], name)):
            counts = sorted({b["test_defects"].count(defect) for b in builds if b is not None})
            n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            values = [
                cell([_defect_value(b, branch, metric, defect, kinds[defect]) for b in builds])
                for branch in branches
            ]
            rows.append([category, defect, kinds[defect], n, *values])
    return markdown_table(["category", "defect type", "kind", "n", *branches], rows, 3)


def collapse_table(records: Sequence[dict]) -> str:
    """Decoder/encoder across-image std per logical level at the kept epoch, per build."""
    with_diagnostics = [r for r in records if r.get("logical_diagnostics")]
    levels = sorted({lv for r in with_diagnostics for lv in r["logical_diagnostics"]["ratio"]})
    rows = [
        [
            r["category"],
            str(r["seed"]),
            *(f"{r['logical_diagnostics']['ratio'].get(lv, float('nan')):.2f}" for lv in levels),
            ", ".join(r["logical_diagnostics"]["collapsed_levels"]) or "none",
        ]
        for r in with_diagnostics
    ]
    return markdown_table(["category", "seed", *levels, "collapsed"], rows, 2)


def time_table(records: Sequence[dict]) -> str:
    """Seconds per build, per category and overall, over seeds."""
    seeds = sorted({r["seed"] for r in records})
    index = {(r["category"], r["seed"]): r["seconds"] for r in records}
    categories = list(dict.fromkeys(r["category"] for r in records))
    rows = [[c, cell([index.get((c, s)) for s in seeds], 0)] for c in categories]
    per_seed = [[index.get((c, s)) for c in categories] for s in seeds]
    overall = [None if None in v else float(np.mean(v)) for v in per_seed]
    rows.append(["**overall**", cell(overall, 0)])
    return markdown_table(["category", "seconds per build"], rows, 1)


def render_block(records: Sequence[dict], meta: dict, tag: str | None) -> str:
    """The generated Markdown: run facts, one table per metric and subset, per defect, times."""
    level = "##" if tag is None else "###"
    counts = meta["counts"]
    settings = f"preset {meta['preset']}, device {meta['device']}, train.seed = the data seed"
    settings += "".join(f", `--set {s}`" for s in meta["overrides"])
    variants = "".join(f"\n  - `{v}`" for v in meta.get("fusion_variants", []))
    parts = [
        f"{level} {'Results' if tag is None else f'Ablation `{tag}`'}\n",
        f"- machine: {meta['machine']}; torch threads {meta['torch_threads']}\n"
        f"- date: {meta['date']}\n"
        f"- commit: {meta['commit']}\n"
        f"- command: `{meta['command']}`\n"
        f"- wall time: {meta['wall_seconds']:.0f} s in all, per build below\n"
        f"- data: synthetic (generator version {meta['generator_version']}), seeds "
        f"{', '.join(map(str, meta['seeds']))}; per category and seed {counts['train']} train, "
        f"{counts['validation']} validation, {counts['test good']} good / "
        f"{counts['test logical']} logical / {counts['test structural']} structural test images\n"
        f"- settings: {settings}\n"
        + (f"- fusion variants (columns `fused[NAME]`):{variants}\n" if variants else ""),
        "Cells: mean ± sample standard deviation over the seeds; **overall**: per seed the mean "
        "over the categories, then mean ± std over the seeds; – : not measured. Image AUROC is "
        "tie-correct (ties count ½), AU-sPRO@0.05 the exact MVTec LOCO metric. A branch column is "
        "that branch's map alone (normalised and blurred as in fusion); fused is the engine's "
        "output; fused[NAME] is the fused map of a fusion variant, calibrated on the same "
        "validation maps.\n",
    ]
    for metric, title in METRICS:
        for key, subset in SUBSETS:
            parts.append(f"{level}# {title}, {subset} subset\n")
            parts.append(category_table(records, metric, key))
    parts.append(f"{level}# Image AUROC per defect type (good vs that type)\n")
    parts.append(defect_table(records))
    parts.append(
        f"{level}# AU-sPRO@0.05 per defect type\n\nEach defect type's part of its subset's "
        "AU-sPRO@0.05: the value the subset would have if all its regions were of that type (the "
        "same thresholds and false-positive rate); the subset's is the region-count-weighted "
        "mean of its types'. n counts images; – : an image holding several types, or a run "
        "from before this table.\n"
    )
    parts.append(defect_table(records, SPRO_PER_DEFECT))
    parts.append(
        f"{level}# Logical decoder collapse check\n\nDecoder/encoder across-image standard "
        "deviation per compared level at the epoch the artifact keeps; a level below the build's "
        "collapse ratio compares every image with one fixed template.\n"
    )
    parts.append(collapse_table(records))
    parts.append(f"{level}# Build time\n")
    parts.append(time_table(records))
    return "\n".join(parts)


# ---- the document and the JSON ------------------------------------------------------------


def markers(tag: str | None) -> tuple[str, str]:
    name = "accuracy" if tag is None else f"accuracy:{tag}"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def update_document(text: str | None, block: str, tag: str | None) -> str:
    """``text`` (a new document when None) with ``block`` between the markers of ``tag``.

    Existing markers: only what lies between them is replaced. Missing ones: the main block
    goes before the ``## Ablations`` heading (else at the end), a tagged one at the end, under
    an ``## Ablations`` heading added if there is none. ValueError on unpaired markers.
    """
    text = NEW_DOCUMENT if text is None else text
    begin, end = markers(tag)
    found = (text.count(begin), text.count(end))
    if found == (1, 1) and text.index(begin) < text.index(end):
        return text[: text.index(begin) + len(begin)] + "\n" + block + text[text.index(end) :]
    if found != (0, 0):
        raise ValueError(
            f"expected one {begin} before one {end}, found {found[0]} and {found[1]} "
            "(fix the markers by hand)"
        )
    section = f"{begin}\n{block}{end}\n"
    text = text if not text or text.endswith("\n") else text + "\n"
    ablations = re.search(r"^## Ablations[ \t]*$", text, re.MULTILINE)
    if tag is None and ablations is not None:
        return text[: ablations.start()] + section + "\n" + text[ablations.start() :]
    if tag is not None and ablations is None:
        text += "\n## Ablations\n"
    return text + "\n" + section


def read_document(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


def results_json(records: Sequence[dict], meta: dict, tag: str | None) -> str:
    """Valid JSON with one line per build, so a rerun's diff shows which builds changed."""
    builds = ",\n".join("  " + json.dumps(record) for record in records)
    head = f'{{\n "format": 1,\n "tag": {json.dumps(tag)},\n "meta": {json.dumps(meta)},\n'
    return head + f' "builds": [\n{builds}\n ]\n}}\n'


def read_run(path: Path) -> tuple[dict, dict[tuple[str, int], dict]]:
    """The ``meta`` (empty when absent or not an object) and the builds by (category, seed)
    of a :func:`results_json` file; ValueError when it is not one."""
    try:
        run = json.loads(path.read_text())
        builds = {(b["category"], int(b["seed"])): b for b in run["builds"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an accuracy JSON ({error})") from None
    meta = run.get("meta")
    return (meta if isinstance(meta, dict) else {}), builds


def read_builds(path: Path) -> dict[tuple[str, int], dict]:
    """The builds of a :func:`results_json` file by (category, seed) (see :func:`read_run`)."""
    return read_run(path)[1]


def partial_json(records: Sequence[dict], settings: dict, wall: float, tag: str | None) -> str:
    """The finished builds of an unfinished run, with the settings a resumed run must share."""
    return results_json(records, {"settings": settings, "wall_seconds": wall}, tag)


def read_partial(path: Path, settings: dict) -> tuple[dict[tuple[str, int], dict], float]:
    """The builds of :func:`partial_json` by (category, seed) and their wall time; ValueError
    when the file is unreadable or its run had other ``settings``."""
    try:
        saved = json.loads(path.read_text())
        then, wall = saved["meta"]["settings"], float(saved["meta"]["wall_seconds"])
        done = {(b["category"], b["seed"]): b for b in saved["builds"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume: {path} is not readable ({error})") from None
    differ = [key for key in settings if then.get(key) != settings[key]]
    if differ:
        shown = "; ".join(f"{k} {then.get(k)!r} then, {settings[k]!r} now" for k in differ)
        raise ValueError(
            f"--resume: {path} comes from a run with other settings ({shown}); "
            "run that command again, or delete the file to start over"
        )
    return done, wall


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step: an interruption leaves the old file or the new one."""
    with atomic_file(path, text=True) as file:
        file.write(text)
