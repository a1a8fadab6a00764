"""Build one category: train, memory bank, calibrate, evaluate, export (``engine.build`` steps).

Calibration and evaluation run through the same :class:`~engine.detector.Detector` the Runtime
loads, at the same batch composition rules, so the artifact reproduces the reported metrics.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.artifact import save_artifact
from engine.calibrate import (
    BranchStats,
    calibrate_threshold,
    fuse_maps,
    image_scores,
    resize_to,
)
from engine.config import BuildConfig
from engine.data.images import read_rgb
from engine.data.loco import LocoDataset
from engine.data.transforms import ImageFolderDataset
from engine.data.types import DatasetError, Sample
from engine.detector import Detector, Maps
from engine.metrics import LocoEvaluator, LocoMetrics, map_path, write_map
from engine.models.logical import LogicalModel
from engine.models.structural import StructuralModel, attach_index
from engine.models.text_prior import category_prompt, resolve_text_prior
from engine.train import train_logical

BRANCHES = ("logical", "structural", "fused")
INFERENCE_BATCH = 8


@dataclass
class BuildResult:
    """What one category's build produced: the artifact, metrics per branch, step timings."""

    category: str
    artifact: Path
    metrics: dict[str, LocoMetrics]
    threshold: float
    seconds: dict[str, float] = field(default_factory=dict)


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
    """The map a branch alone yields: normalised and blurred like the fused map, other weight 0."""
    if branch == "fused":
        assert maps.fused is not None
        return maps.fused
    only = replace(
        detector.fusion,
        logical_weight=1.0 if branch == "logical" else 0.0,
        structural_weight=1.0 if branch == "structural" else 0.0,
    )
    assert detector.logical_stats is not None and detector.structural_stats is not None
    return fuse_maps(
        maps.logical, maps.structural, detector.logical_stats, detector.structural_stats, only
    )


def calibrate(
    detector: Detector, samples: Sequence[Sample], rate: float, progress: bool
) -> tuple[BranchStats, BranchStats, float, np.ndarray]:
    """Branch statistics over all validation pixels, then the image-score threshold.

    Returns (logical stats, structural stats, threshold, validation image scores). The scores are
    maxima of the fused map at the original image size, exactly as the Runtime computes them.
    """
    logical, structural, sizes = [], [], []
    for _, frames in frame_batches(samples, INFERENCE_BATCH, "validation maps", progress):
        maps = detector(frames.to(detector.device))
        logical.append(maps.logical.cpu())
        structural.append(maps.structural.cpu())
        sizes.append(frames.shape[1:3])
    detector.logical_stats = BranchStats.fit(logical)
    detector.structural_stats = BranchStats.fit(structural)
    scores = []
    for lmap, smap, (height, width) in zip(logical, structural, sizes, strict=True):
        fused = fuse_maps(
            lmap, smap, detector.logical_stats, detector.structural_stats, detector.fusion
        )
        scores.append(image_scores(resize_to(fused, (int(height), int(width)))))
    scores_np = torch.cat(scores).numpy()
    threshold = calibrate_threshold(scores_np, rate)
    return detector.logical_stats, detector.structural_stats, threshold, scores_np


def evaluate(
    detector: Detector,
    dataset: LocoDataset,
    save_maps: Path | None,
    progress: bool,
) -> dict[str, LocoMetrics]:
    """Exact LOCO metrics of each branch alone and of the fused map, at original resolution.

    With ``save_maps`` the fused maps are written as float32 TIFFs in the official layout.
    """
    evaluators = {branch: LocoEvaluator() for branch in BRANCHES}
    samples = dataset.samples("test")
    for chunk, frames in frame_batches(samples, INFERENCE_BATCH, "test maps", progress):
        maps = detector(frames.to(detector.device))
        size = (int(frames.shape[1]), int(frames.shape[2]))
        for branch in BRANCHES:
            full = resize_to(branch_only(maps, branch, detector), size).cpu().numpy()
            for sample, anomaly_map in zip(chunk, full, strict=True):
                channels = dataset.ground_truth(sample)
                evaluators[branch].add(anomaly_map, sample.defect_type, channels, sample.stem)
                if save_maps is not None and branch == "fused":
                    write_map(map_path(save_maps, sample), anomaly_map)
    return {
        branch: evaluator.compute(progress=progress and branch == "fused")
        for branch, evaluator in evaluators.items()
    }


def build_category(
    data_root: str | Path,
    category: str,
    out: str | Path,
    config: BuildConfig,
    device: torch.device,
    save_maps: str | Path | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> BuildResult:
    """Train, fit, calibrate, evaluate and export one MVTec LOCO AD category to ``out``.

    Training checkpoints live in ``<out>.checkpoints/`` next to the artifact until the artifact
    is written, so an interrupted build resumes its training where it stopped.
    """
    seconds: dict[str, float] = {}
    out = Path(out)
    dataset = LocoDataset(data_root, category)
    for split in ("train", "validation", "test"):
        if not dataset.samples(split):
            raise DatasetError(f"{Path(data_root) / category / split}: no images")

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
        detector = Detector(
            logical, structural, config.fusion, structural_size=config.structural.image_size
        )

    with _step(seconds, "train logical module", verbose):
        train_set = ImageFolderDataset(
            dataset.samples("train"), detector.logical_transform, progress=progress
        )
        val_set = ImageFolderDataset(
            dataset.samples("validation"), detector.logical_transform, progress=progress
        )
        checkpoints = out.with_name(out.name + ".checkpoints")
        trained = train_logical(
            logical, train_set, val_set, config.train, checkpoints, device, progress
        )
        if verbose:
            print(
                f"trained {len(trained.train_losses)} epochs, keeping epoch {trained.best_epoch} "
                f"(val loss {min(trained.val_losses):.4f})",
                flush=True,
            )

    with _step(seconds, "structural memory bank", verbose):
        bank_set = (
            train_set
            if detector.shares_input
            else ImageFolderDataset(
                dataset.samples("train"), detector.structural_transform, progress=progress
            )
        )
        loader = DataLoader(bank_set, batch_size=INFERENCE_BATCH, shuffle=False)
        structural.fit(loader, config.structural, device, progress)
        detector.to(device)
        index_kind = attach_index(structural, config.structural.index, device)
        if verbose:
            print(f"memory bank: {tuple(structural.bank.shape)}, search: {index_kind}", flush=True)

    with _step(seconds, "calibrate on validation", verbose):
        _, _, threshold, val_scores = calibrate(
            detector, dataset.samples("validation"), config.fusion.target_false_alarm_rate, progress
        )

    with _step(seconds, "evaluate on test", verbose):
        metrics = evaluate(
            detector, dataset, Path(save_maps) if save_maps is not None else None, progress
        )

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
            },
            "metrics": {branch: summary(m) for branch, m in metrics.items()},
            "build_seconds": seconds,
        }
        artifact = save_artifact(out, detector, config, info)
        shutil.rmtree(checkpoints, ignore_errors=True)
    return BuildResult(category, artifact, metrics, threshold, seconds)


def summary(metrics: LocoMetrics) -> dict:
    """Image AUROC and AU-sPRO@0.05 per subset (logical, structural, mean) of one branch."""
    return {
        "image_auroc": dict(metrics.auroc),
        "image_auroc_tie_correct": dict(metrics.auroc_tie_correct),
        "au_spro_0.05": {kind: values.get(0.05) for kind, values in metrics.auc_spro.items()},
    }


__all__ = ["BuildResult", "build_category", "calibrate", "evaluate", "summary"]
