"""Build one category: train, memory bank, calibrate, evaluate, export (``engine.build`` steps).

Calibration and evaluation run through the same :class:`~engine.detector.Detector` the Runtime
loads, at the same batch composition rules, so the artifact reproduces the reported metrics.

Everything that can be checked without a model is checked first (:func:`check_outputs`,
:func:`validate_inputs`, :func:`check_index_kind`), so bad input or a bad output path fails in
seconds and leaves nothing behind: no checkpoints, no maps, no artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine import artifact as artifact_module
from engine.artifact import save_artifact
from engine.calibrate import (
    BranchStats,
    calibrate_threshold,
    fuse_maps,
    image_scores,
    resize_to,
)
from engine.config import BuildConfig
from engine.data.images import read_image_size, read_rgb
from engine.data.loco import LocoDataset
from engine.data.transforms import ImageFolderDataset
from engine.data.types import GOOD, SPLITS, DatasetError, GroundTruthChannel, Sample
from engine.detector import Detector, Maps
from engine.metrics import LocoEvaluator, LocoMetrics, auroc, map_path, write_map
from engine.models.knn_index import faiss_available, faiss_gpu_available
from engine.models.logical import LogicalModel
from engine.models.logical_diagnostics import (
    COLLAPSE_RATIO,
    collapse_warning,
    format_diagnostics,
    logical_diagnostics,
    probe_batch,
)
from engine.models.structural import StructuralModel, attach_index
from engine.models.text_prior import category_prompt, resolve_text_prior
from engine.models.weights import WeightsInfo, file_sha256
from engine.train import (
    Diagnose,
    TrainResult,
    check_checkpoint_dir,
    discard_checkpoints,
    train_logical,
)

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
) -> Evaluation:
    """Exact LOCO metrics of each branch alone and of the fused map, at original resolution,
    and every test image's score per branch with its defect name.

    With ``save_maps`` the fused maps are written as float32 TIFFs in the official layout.
    """
    evaluators = {branch: LocoEvaluator() for branch in BRANCHES}
    scores: dict[str, list[float]] = {branch: [] for branch in BRANCHES}
    defects: list[str] = []
    samples = dataset.samples("test")
    written: list[Path] = []
    try:
        for chunk, frames in frame_batches(samples, INFERENCE_BATCH, "test maps", progress):
            maps = detector(frames.to(detector.device))
            size = (int(frames.shape[1]), int(frames.shape[2]))
            truths = [dataset.ground_truth(sample) for sample in chunk]
            defects += [defect_name(channels) for channels in truths]
            for branch in BRANCHES:
                full = resize_to(branch_only(maps, branch, detector), size).cpu().numpy()
                for sample, channels, anomaly_map in zip(chunk, truths, full, strict=True):
                    evaluators[branch].add(anomaly_map, sample.defect_type, channels, sample.stem)
                    scores[branch].append(float(anomaly_map.max()))
                    if save_maps is not None and branch == "fused":
                        path = map_path(save_maps, sample)
                        write_map(path, anomaly_map)  # atomic: a failed write leaves nothing
                        written.append(path)
    except BaseException as error:
        if written:
            _remove_partial_maps(written, len(samples), save_maps, error)
        raise
    metrics = {
        branch: evaluator.compute(progress=progress and branch == "fused")
        for branch, evaluator in evaluators.items()
    }
    return Evaluation(metrics, {b: np.asarray(s) for b, s in scores.items()}, defects)


def defect_name(channels: Sequence[GroundTruthChannel]) -> str:
    """``good`` without channels, else the channels' distinct defect names, sorted, ``+``-joined
    (a channel without a ``defects_config.json`` entry counts as ``unnamed``)."""
    if not channels:
        return GOOD
    return "+".join(sorted({c.defect.name if c.defect else "unnamed" for c in channels}))


def image_auroc_per_defect(scores: np.ndarray, defects: Sequence[str]) -> dict[str, float]:
    """Tie-correct image AUROC of good images vs the images of each defect name.

    ``scores`` (N,) and ``defects`` (N,) as in :class:`Evaluation`; empty without good images.
    """
    names = np.asarray(defects)
    good = scores[names == GOOD]
    if good.size == 0:
        return {}
    return {name: auroc(good, scores[names == name]) for name in sorted(set(defects) - {GOOD})}


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
        fingerprint = {
            "data": data_digest,
            "weights": _weights_digest(logical.encoder.weights),
            "text prior": _digest(text_identity),
        }
        probe = probe_batch(val_set, train_set)
        trained = train_logical(
            logical,
            train_set,
            val_set,
            config.train,
            checkpoints,
            device,
            progress,
            fingerprint=fingerprint,
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


def checkpoint_folder(out: Path) -> Path:
    """Where the build keeps the training checkpoints of the artifact ``out``."""
    return out.with_name(out.name + ".checkpoints")


def check_output_folder(path: Path, option: str) -> None:
    """Raise ValueError unless ``path`` is a writable folder or can be created as one.

    ``option`` names the setting in the message (e.g. ``--save-maps``).
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a folder")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ValueError(f"{option} {path}: {existing} is a dangling symlink")
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: cannot be created, {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable")


def check_outputs(out: Path, save_maps: Path | None) -> None:
    """Refuse outputs the build must not replace or cannot write, before any work.

    ``out`` must be absent, empty or an engine artifact (:func:`engine.artifact.check_target`),
    its checkpoint folder absent or engine-made, and ``save_maps`` a writable folder.
    """
    artifact_module.check_target(out)
    check_checkpoint_dir(checkpoint_folder(out))
    if save_maps is not None:
        check_output_folder(save_maps, "--save-maps")


def check_index_kind(kind: str, device: torch.device) -> None:
    """Raise RuntimeError when the structural kNN index ``kind`` cannot run on this machine."""
    if kind.startswith("faiss") and not faiss_available():
        raise RuntimeError(
            f"structural.index={kind} needs FAISS, which is not installed; install faiss-cpu "
            "or use --set structural.index=torch"
        )
    if kind == "faiss_gpu" and not faiss_gpu_available():
        raise RuntimeError(
            "structural.index=faiss_gpu needs a FAISS build with GPU support and a visible GPU; "
            "this installation has none (use --set structural.index=torch, which searches on "
            f"{device.type} too)"
        )


def validate_inputs(dataset: LocoDataset, progress: bool) -> None:
    """Check every file the build reads, before any training, so bad input costs no work.

    Every image header (readable, within Pillow's pixel limit), one image size per validation
    and test split (inference batches need it), every test image decoded in full (training and
    validation images are decoded before training anyway), every ground-truth mask read and
    matched to ``defects_config.json`` and to its image's size with a positive sPRO saturation
    area, and at least one anomalous test image. Raises DatasetError naming the file.
    """
    for split in SPLITS:
        if not dataset.samples(split):
            raise DatasetError(f"{dataset.path / split}: no images")
    for sample in dataset.samples("train"):
        read_image_size(sample.image_path)
    dataset.image_size("validation")
    dataset.image_size("test")
    test = dataset.samples("test")
    for sample in tqdm(test, desc="check test data", unit="img", disable=not progress):
        read_rgb(sample.image_path)
        channels = dataset.ground_truth(sample)
        for mask_path, channel in zip(sample.mask_paths, channels, strict=True):
            if channel.saturation_area <= 0:  # sPRO divides by it
                raise DatasetError(
                    f"{mask_path}: saturation area {channel.saturation_area} for a defect of "
                    f"{channel.area} pixels ({channel.defect}); raise its saturation_threshold "
                    "in defects_config.json"
                )
    if not any(sample.label for sample in test):
        raise DatasetError(
            f"{dataset.path / 'test'}: no anomalous test image; the LOCO metrics need at least one"
        )


def data_fingerprint(dataset: LocoDataset) -> str:
    """sha256 over (path relative to the category folder, content sha256) of every training and
    validation image: what a resumed training must find unchanged.

    Content hashes rather than (size, mtime): copying or re-extracting a dataset changes mtimes
    but not the data, and must not block a resume, while an edit in place can keep the size.
    Training decodes every one of these files anyway, so this costs one more read of each.
    """
    digest = hashlib.sha256()
    for split in ("train", "validation"):
        for sample in dataset.samples(split):
            relative = sample.image_path.relative_to(dataset.path).as_posix()
            digest.update(f"{relative}\0{file_sha256(sample.image_path)}\n".encode())
    return digest.hexdigest()


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _weights_digest(info: WeightsInfo) -> str:
    """What the encoder computes with: its file's content (not where the file lies), else its
    source (seeded random or the packaged weights), plus the input normalisation."""
    return _digest([info.arch, info.sha256 or info.source, info.mean, info.std])


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
    "BuildResult",
    "Evaluation",
    "build_category",
    "calibrate",
    "check_index_kind",
    "check_output_folder",
    "check_outputs",
    "checkpoint_folder",
    "data_fingerprint",
    "defect_name",
    "evaluate",
    "image_auroc_per_defect",
    "summary",
    "validate_inputs",
]
