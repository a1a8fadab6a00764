"""Build one category: train, memory bank, calibrate, evaluate, export (``engine.build`` steps).

Calibration and evaluation run through the same :class:`~engine.detector.Detector` the Runtime
loads, at the same batch composition rules, so the artifact reproduces the reported metrics.

Everything that can be checked without a model is checked first (:mod:`engine.preflight`), so
bad input or a bad output path fails in seconds and leaves nothing behind.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.artifact import save_artifact
from engine.calibrate import BranchStats, calibrate_threshold, fuse_maps, image_scores, resize_to
from engine.config import BuildConfig
from engine.data.images import read_rgb
from engine.data.loco import LocoDataset
from engine.data.transforms import ImageFolderDataset
from engine.data.types import DatasetError, Sample
from engine.detector import Detector, Maps, model_transform
from engine.metrics import LocoEvaluator, LocoMetrics, map_path, write_map
from engine.metrics.per_defect import defect_name, image_auroc_per_defect
from engine.models.composition import CompositionModel
from engine.models.logical import LogicalModel
from engine.models.logical_diagnostics import (
    COLLAPSE_RATIO,
    collapse_warning,
    format_diagnostics,
    logical_diagnostics,
    probe_batch,
)
from engine.models.structural import (
    StructuralModel,
    attach_index,
    coreset_bank,
    extract_patch_features,
)
from engine.models.text_prior import category_prompt, resolve_text_prior
from engine.preflight import (
    check_index_kind,
    check_outputs,
    checkpoint_folder,
    data_fingerprint,
    training_fingerprint,
    validate_inputs,
)
from engine.train import Diagnose, TrainResult, discard_checkpoints, train_logical

FUSED = "fused"
INFERENCE_BATCH = 8


@dataclass
class BuildResult:
    """What one category's build produced: the artifact, metrics per branch, step timings."""

    category: str
    artifact: Path
    metrics: dict[str, LocoMetrics]
    threshold: float
    seconds: dict[str, float] = field(default_factory=dict)
    # per branch: (N,) image score of each test image (see Evaluation), and its defect name
    image_scores: dict[str, np.ndarray] = field(default_factory=dict)
    test_defects: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """What :func:`evaluate` measured on the test split, images in ``samples("test")`` order.

    ``image_scores[branch]`` is (N,) float64: the max of the branch's map at original size,
    exactly the image score the LOCO metrics use. ``test_defects`` is (N,) names: ``good``, the
    image's defect name, or its distinct defect names sorted and joined with ``+``.
    """

    metrics: dict[str, LocoMetrics]
    image_scores: dict[str, np.ndarray]
    test_defects: list[str]


@contextmanager
def _step(seconds: dict[str, float], name: str, verbose: bool) -> Iterator[None]:
    if verbose:
        print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def frame_batches(
    samples: Sequence[Sample], batch_size: int, desc: str, progress: bool
) -> Iterator[tuple[list[Sample], torch.Tensor]]:
    """Decoded test/validation images as uint8 (B, H, W, 3) batches (a category shares one size)."""
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


def branch_only(maps: Maps, branch: str, detector: Detector) -> torch.Tensor:
    """The map a branch alone yields: normalised and blurred like the fused map, weight 1."""
    if branch == FUSED:
        assert maps.fused is not None
        return maps.fused
    only = {branch: maps.branches()[branch]}
    assert detector.stats is not None
    sigma = detector.fusion.sigma_at(detector.map_size)
    return fuse_maps(only, detector.stats, {branch: 1.0}, sigma)


def calibrate(
    detector: Detector, samples: Sequence[Sample], rate: float, progress: bool
) -> tuple[float, np.ndarray]:
    """Each branch's statistics over all validation pixels (stored in ``detector.stats``), then
    the image-score threshold.

    Returns (threshold, validation image scores). The scores are maxima of the fused map at the
    original image size, exactly as the Runtime computes them.
    """
    branch_maps: list[dict[str, torch.Tensor]] = []
    sizes = []
    for _, frames in frame_batches(samples, INFERENCE_BATCH, "validation maps", progress):
        maps = detector(frames.to(detector.device))
        branch_maps.append({b: m.cpu() for b, m in maps.branches().items()})
        sizes.append(frames.shape[1:3])
    detector.stats = {
        branch: BranchStats.fit(chunk[branch] for chunk in branch_maps)
        for branch in detector.branch_names
    }
    scores = [
        image_scores(resize_to(detector.fuse(chunk), (int(height), int(width))))
        for chunk, (height, width) in zip(branch_maps, sizes, strict=True)
    ]
    scores_np = torch.cat(scores).numpy()
    return calibrate_threshold(scores_np, rate), scores_np


def evaluate(
    detector: Detector,
    dataset: LocoDataset,
    save_maps: Path | None,
    progress: bool,
) -> Evaluation:
    """Exact LOCO metrics of each branch alone and of the fused map, at original resolution,
    and every test image's score per branch with its defect name.

    With ``save_maps`` the fused maps are written as float32 TIFFs in the official layout.
    """
    branches = (*detector.branch_names, FUSED)
    evaluators = {branch: LocoEvaluator() for branch in branches}
    scores: dict[str, list[float]] = {branch: [] for branch in branches}
    defects: list[str] = []
    samples = dataset.samples("test")
    written: list[Path] = []
    try:
        for chunk, frames in frame_batches(samples, INFERENCE_BATCH, "test maps", progress):
            maps = detector(frames.to(detector.device))
            size = (int(frames.shape[1]), int(frames.shape[2]))
            truths = [dataset.ground_truth(sample) for sample in chunk]
            defects += [defect_name(channels) for channels in truths]
            for branch in branches:
                full = resize_to(branch_only(maps, branch, detector), size).cpu().numpy()
                for sample, channels, anomaly_map in zip(chunk, truths, full, strict=True):
                    evaluators[branch].add(anomaly_map, sample.defect_type, channels, sample.stem)
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


def build_category(
    data_root: str | Path,
    category: str,
    out: str | Path,
    config: BuildConfig,
    device: torch.device,
    save_maps: str | Path | None = None,
    progress: bool = True,
    verbose: bool = True,
    fresh: bool = False,
) -> BuildResult:
    """Train, fit, calibrate, evaluate and export one MVTec LOCO AD category to ``out``.

    Training checkpoints live in ``<out>.checkpoints/`` next to the artifact until the artifact
    is written, so an interrupted build resumes its training where it stopped, provided the
    data, weights, text prior and configs are unchanged (else ValueError); ``fresh`` discards
    them first. Outputs and every input file are checked before any model is built.
    """
    seconds: dict[str, float] = {}
    out = Path(out)
    maps_root = Path(save_maps) if save_maps is not None else None
    checkpoints = checkpoint_folder(out)
    check_outputs(out, maps_root)
    dataset = LocoDataset(data_root, category)
    with _step(seconds, "validate inputs", verbose):
        validate_inputs(dataset, progress)
        check_index_kind(config.structural.index, device)
        data_digest = data_fingerprint(dataset)
    if fresh:
        discard_checkpoints(checkpoints)

    with _step(seconds, "text prior and models", verbose):
        prior = resolve_text_prior(config.text_prior, config.clip_checkpoint, verbose=verbose)
        prompt = category_prompt(category)
        embedding = prior.embed(prompt) if prior is not None else None
        text_identity = {**(prior.identity if prior is not None else {"kind": "learned"})}
        text_identity["prompt"] = prompt
        text_identity["dim"] = None if embedding is None else int(embedding.numel())
        torch.manual_seed(config.train.seed)
        logical = LogicalModel.build(
            config.logical, embedding, config.weights, config.allow_random, verbose
        )
        structural = StructuralModel.from_config(
            config.structural, config.weights, config.allow_random, verbose
        )
        logical_transform = model_transform(config.logical.image_size, logical.encoder)
        structural_transform = model_transform(
            config.structural.image_size, structural.patch_features.backbone
        )

    with _step(seconds, "train logical module", verbose):
        train_set = ImageFolderDataset(
            dataset.samples("train"), logical_transform, progress=progress
        )
        val_set = ImageFolderDataset(
            dataset.samples("validation"), logical_transform, progress=progress
        )
        probe = probe_batch(val_set, train_set)
        trained = train_logical(
            logical,
            train_set,
            val_set,
            config.train,
            checkpoints,
            device,
            progress,
            fingerprint=training_fingerprint(data_digest, logical.encoder.weights, text_identity),
            diagnose=_epoch_diagnostics(probe, verbose),
        )
        if verbose:
            print(
                f"trained {len(trained.train_losses)} epochs, keeping epoch {trained.best_epoch} "
                f"(val loss {min(trained.val_losses):.4f})",
                flush=True,
            )
        _warn_if_collapsed(trained, logical, probe)

    with _step(seconds, "structural memory bank", verbose):
        bank_set = (
            train_set
            if structural_transform == logical_transform
            else ImageFolderDataset(
                dataset.samples("train"), structural_transform, progress=progress
            )
        )
        loader = DataLoader(bank_set, batch_size=INFERENCE_BATCH, shuffle=False)
        features, grid = extract_patch_features(structural.patch_features, loader, device, progress)
        structural.set_bank(
            coreset_bank(
                features, config.structural, device, progress, structural.patch_features.basis
            )
        )
        structural.to(device)
        index_kind = attach_index(structural, config.structural.index, device)
        if verbose:
            print(f"memory bank: {tuple(structural.bank.shape)}, search: {index_kind}", flush=True)

    composition = None
    if config.composition.enabled:
        with _step(seconds, "composition model", verbose):
            composition = CompositionModel(config.composition, int(features.shape[-1]), grid)
            composition.to(device).fit(features, grid)
    del features
    detector = Detector(
        logical,
        structural,
        config.fusion,
        structural_size=config.structural.image_size,
        composition=composition,
    ).to(device)

    with _step(seconds, "calibrate on validation", verbose):
        threshold, val_scores = calibrate(
            detector, dataset.samples("validation"), config.fusion.target_false_alarm_rate, progress
        )

    with _step(seconds, "evaluate on test", verbose):
        evaluation = evaluate(detector, dataset, maps_root, progress)
        metrics = evaluation.metrics

    with _step(seconds, "export artifact", verbose):
        info = {
            "category": category,
            "text_prior": text_identity,
            "threshold": threshold,
            "validation_scores": val_scores.tolist(),
            "training": {
                "train_losses": trained.train_losses,
                "val_losses": trained.val_losses,
                "best_epoch": trained.best_epoch,
                "diagnostics": trained.diagnostics,
                "collapse_ratio": COLLAPSE_RATIO,
            },
            "metrics": {
                branch: summary(m, evaluation.image_scores[branch], evaluation.test_defects)
                for branch, m in metrics.items()
            },
            "build_seconds": seconds,
        }
        artifact = save_artifact(out, detector, config, info)
        discard_checkpoints(checkpoints)
    return BuildResult(
        category,
        artifact,
        metrics,
        threshold,
        seconds,
        evaluation.image_scores,
        evaluation.test_defects,
    )


def _epoch_diagnostics(probe: torch.Tensor, verbose: bool) -> Diagnose:
    """The training's per-epoch hook: collapse diagnostics on ``probe``, one line each."""

    def diagnose(model: LogicalModel, epoch: int) -> dict:
        diagnostics = logical_diagnostics(model, probe)
        if verbose:
            tqdm.write(f"epoch {epoch}: {format_diagnostics(diagnostics)}")
        return diagnostics

    return diagnose


def _warn_if_collapsed(trained: TrainResult, model: LogicalModel, probe: torch.Tensor) -> None:
    """Warn on stderr when the weights kept (the best epoch's) have a collapsed level."""
    kept = [d for d in trained.diagnostics if d["epoch"] == trained.best_epoch]
    warning = collapse_warning(kept[0] if kept else logical_diagnostics(model, probe))
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)


def summary(metrics: LocoMetrics, scores: np.ndarray, defects: Sequence[str]) -> dict:
    """Image AUROC and AU-sPRO@0.05 per subset (logical, structural, mean) of one branch, and
    its image AUROC per defect type from the test images' ``scores`` and ``defects`` (N,)."""
    return {
        "image_auroc": dict(metrics.auroc),
        "image_auroc_tie_correct": dict(metrics.auroc_tie_correct),
        "au_spro_0.05": {kind: values.get(0.05) for kind, values in metrics.auc_spro.items()},
        "image_auroc_per_defect": image_auroc_per_defect(scores, defects),
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
    "BuildResult",
    "Evaluation",
    "build_category",
    "calibrate",
    "evaluate",
    "summary",
]
