"""The build's test step: a calibrated detector on a dataset's test split, each branch alone and
fused, with the metrics the data allows (:func:`engine.data.formats.evaluation_level`).

Maps are compared at the images' original resolution, through the same
:class:`~engine.detector.Detector` the Runtime loads, so the artifact reproduces the reported
metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.calibrate import resize_to, standardised_maps
from engine.data.formats import NO_METRICS, CategoryDataset, evaluation_level
from engine.data.images import read_rgb
from engine.data.types import DatasetError, Sample
from engine.detector import Detector, Maps
from engine.metrics import (
    LocoMetrics,
    TestMetrics,
    make_evaluator,
    map_path,
    metrics_json,
    write_map,
)
from engine.metrics.per_defect import image_auroc_per_defect, test_defect
from engine.models.fusion import Fusion

FUSED = "fused"
INFERENCE_BATCH = 8


@dataclass
class Evaluation:
    """What :func:`evaluate` measured on the test split, images in ``samples("test")`` order.

    ``metrics`` per branch (empty at level ``none``). ``image_scores[branch]`` is (N,) float64:
    the max of the branch's map at original size, exactly the image score the metrics use.
    ``test_defects`` is (N,) names (:func:`~engine.metrics.per_defect.test_defect`): ``good``,
    the LOCO defect names joined with ``+``, or the defect folder (MVTec AD type, ``bad``).
    """

    metrics: dict[str, TestMetrics]
    image_scores: dict[str, np.ndarray]
    test_defects: list[str]


def frame_batches(
    samples: Sequence[Sample], batch_size: int, desc: str, progress: bool
) -> Iterator[tuple[list[Sample], torch.Tensor]]:
    """Decoded test/validation images as uint8 (B, H, W, 3) batches (a split shares one size)."""
    for start in tqdm(
        range(0, len(samples), batch_size), desc=desc, unit="batch", disable=not progress
    ):
        chunk = list(samples[start : start + batch_size])
        images = [read_rgb(sample.image_path) for sample in chunk]
        shapes = {image.shape for image in images}
        if len(shapes) != 1:
            raise DatasetError(
                f"{chunk[0].image_path.parent}: images of one split differ in size {sorted(shapes)}"
            )
        yield chunk, torch.from_numpy(np.stack(images))


def variant_name(name: str) -> str:
    """The metrics key of the fused map under the fusion variant ``name``."""
    return f"{FUSED}[{name}]"


def branch_only(maps: Maps, branch: str, detector: Detector) -> torch.Tensor:
    """The map a branch alone yields: normalised and blurred like the fused map, weight 1."""
    if branch == FUSED:
        assert maps.fused is not None
        return maps.fused
    only = {branch: maps.branches()[branch]}
    assert detector.stats is not None
    return standardised_maps(only, detector.stats, detector.fusion.sigma)[branch]


def evaluate(
    detector: Detector,
    dataset: CategoryDataset,
    save_maps: Path | None,
    progress: bool,
    variants: Mapping[str, Fusion] | None = None,
) -> Evaluation:
    """The metrics of each branch alone and of the fused map at the dataset's evaluation level,
    and every test image's score per branch with its defect name.

    ``variants``: calibrated fusions (name -> :class:`~engine.models.fusion.Fusion`) measured
    on the same branch maps, as :func:`variant_name` keys. With ``save_maps`` the fused maps
    are written as float32 TIFFs in the official layout.
    """
    variants = dict(variants or {})
    level = evaluation_level(dataset)
    branches = (*detector.branch_names, FUSED, *map(variant_name, variants))
    evaluators = {} if level == NO_METRICS else {b: make_evaluator(level) for b in branches}
    scores: dict[str, list[float]] = {branch: [] for branch in branches}
    defects: list[str] = []
    samples = dataset.samples("test")
    written: list[Path] = []
    try:
        for chunk, frames in frame_batches(samples, INFERENCE_BATCH, "test maps", progress):
            maps = detector(frames.to(detector.device))
            size = (int(frames.shape[1]), int(frames.shape[2]))
            truths = [dataset.ground_truth(sample) for sample in chunk]
            defects += [test_defect(s, c) for s, c in zip(chunk, truths, strict=True)]
            named = {b: branch_only(maps, b, detector) for b in (*detector.branch_names, FUSED)}
            named |= {
                variant_name(n): fusion(maps.fusion_inputs()) for n, fusion in variants.items()
            }
            for branch in branches:
                full = resize_to(named[branch], size).cpu().numpy()
                for sample, channels, anomaly_map in zip(chunk, truths, full, strict=True):
                    if evaluators:
                        evaluators[branch].add(anomaly_map, sample, channels, sample.stem)
                    scores[branch].append(float(anomaly_map.max()))
                    if save_maps is not None and branch == FUSED:
                        path = map_path(save_maps, sample)
                        write_map(path, anomaly_map)  # atomic: a failed write leaves nothing
                        written.append(path)
    except BaseException as error:
        if written:
            _remove_partial_maps(written, len(samples), save_maps, error)
        raise
    metrics = {
        branch: evaluator.compute(progress=progress and branch == FUSED)
        for branch, evaluator in evaluators.items()
    }
    return Evaluation(metrics, {b: np.asarray(s) for b, s in scores.items()}, defects)


def summary(metrics: TestMetrics, scores: np.ndarray, defects: Sequence[str]) -> dict:
    """The manifest's metrics of one branch, and its image AUROC per defect type from the test
    images' ``scores`` and ``defects`` (N,).

    LOCO: image AUROC (official and tie-correct) and AU-sPRO@0.05 per subset (logical,
    structural, mean), and per subset each defect's AU-sPRO@0.05
    (:attr:`~engine.metrics.loco.LocoMetrics.auc_spro_per_defect`). Other levels:
    :func:`~engine.metrics.metrics_json`'s values.
    """
    per_defect = {"image_auroc_per_defect": image_auroc_per_defect(scores, defects)}
    if not isinstance(metrics, LocoMetrics):
        return {**metrics_json(metrics), **per_defect}
    return {
        "image_auroc": dict(metrics.auroc),
        "image_auroc_tie_correct": dict(metrics.auroc_tie_correct),
        "au_spro_0.05": {kind: values.get(0.05) for kind, values in metrics.auc_spro.items()},
        **per_defect,
        "au_spro_0.05_per_defect": {
            kind: {name: values.get(0.05) for name, values in defects.items()}
            for kind, defects in metrics.auc_spro_per_defect.items()
        },
    }


def _remove_partial_maps(
    written: list[Path], total: int, maps_root: Path, error: BaseException
) -> None:
    """Delete the maps a failed evaluation wrote and say so on ``error``: a partial set, maybe
    beside older maps, must not look like this run's result."""
    for path in written:
        path.unlink(missing_ok=True)
    error.add_note(
        f"evaluation stopped after writing {len(written)} of {total} fused maps under "
        f"{maps_root}; those maps were deleted (they were incomplete)"
    )


__all__ = [
    "FUSED",
    "INFERENCE_BATCH",
    "Evaluation",
    "branch_only",
    "evaluate",
    "summary",
    "variant_name",
]
