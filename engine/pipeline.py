"""Build one category: train, memory bank, calibrate, evaluate, export (``engine.build`` steps).

Calibration and evaluation (:mod:`engine.evaluation`) run through the same
:class:`~engine.detector.Detector` the Runtime loads, at the same batch composition rules, so the
artifact reproduces the reported metrics.

Everything that can be checked without a model is checked first (:mod:`engine.preflight`), so
bad input or a bad output path fails in seconds and leaves nothing behind; what the test split
can evaluate is decided then too, so a trained model is always exported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.artifact import save_artifact
from engine.artifact_manifest import check_config_bounds
from engine.calibrate import (
    BranchStats,
    FusionConfig,
    calibrate_threshold,
    image_scores,
    resize_to,
    standardised_maps,
)
from engine.composition_calibration import calibrate_composition, needs_calibration
from engine.config import BuildConfig
from engine.data.formats import (
    FORMAT_NAMES,
    CategoryDataset,
    evaluation_level,
    evaluation_plan,
    format_of,
    open_dataset,
)
from engine.data.transforms import ImageFolderDataset
from engine.data.types import Sample
from engine.detector import Detector, StructuralSide, model_transform
from engine.evaluation import (
    FUSED,
    INFERENCE_BATCH,
    Evaluation,
    evaluate,
    frame_batches,
    summary,
)
from engine.max_merge import fit_background_scales, fit_image_stats
from engine.metrics import TestMetrics
from engine.models.composition import CompositionModel
from engine.models.composition.fine import fit_fine_parts
from engine.models.fusion import Fusion
from engine.models.knn_index import auto_index, auto_index_params
from engine.models.logical import LogicalModel
from engine.models.logical_diagnostics import (
    COLLAPSE_RATIO,
    collapse_warning,
    format_diagnostics,
    logical_diagnostics,
    probe_batch,
)
from engine.models.positional import PositionalModel
from engine.models.structural import (
    StructuralModel,
    attach_index,
    build_memory_bank,
    extract_patch_features,
    loader_images,
)
from engine.models.text_prior import category_prompt, resolve_text_prior
from engine.preflight import (
    check_index_kind,
    check_outputs,
    check_training_images,
    checkpoint_folder,
    data_fingerprint,
    training_fingerprint,
    validate_inputs,
)
from engine.train import Diagnose, TrainResult, discard_checkpoints, train_logical

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What one category's build produced: the artifact, metrics per branch, step timings."""

    category: str
    artifact: Path
    metrics: dict[str, TestMetrics]  # per branch; empty when the data allows no test metrics
    threshold: float
    seconds: dict[str, float] = field(default_factory=dict)
    # per branch: (N,) image score of each test image (see Evaluation), and its defect name
    image_scores: dict[str, np.ndarray] = field(default_factory=dict)
    test_defects: list[str] = field(default_factory=list)
    data_format: str = "loco"  # engine.data.formats: loco, mvtec or folder
    evaluation_level: str = "loco"  # what the test split measured: loco, pixel, image or none
    # per branch (and fused): (M,) image score of each validation image, scored like the test
    # images, so fusions can be recombined from the scores alone
    validation_image_scores: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ValidationMaps:
    """The validation split's branch maps: one dict (branch -> (B, S, S), with the placement
    map when there is one) per batch, and each batch's original image size (H, W)."""

    branch_maps: list[dict[str, torch.Tensor]]
    sizes: list[tuple[int, int]]


@contextmanager
def _step(seconds: dict[str, float], name: str, verbose: bool) -> Iterator[None]:
    if verbose:
        print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def validation_maps(
    detector: Detector, samples: Sequence[Sample], progress: bool
) -> ValidationMaps:
    """Every validation image's branch maps at model size, with the placement map
    (:meth:`~engine.detector.Maps.fusion_inputs`), on the CPU, by batch."""
    branch_maps: list[dict[str, torch.Tensor]] = []
    sizes = []
    for _, frames in frame_batches(samples, INFERENCE_BATCH, "validation maps", progress):
        maps = detector(frames.to(detector.device))
        branch_maps.append({b: m.cpu() for b, m in maps.fusion_inputs().items()})
        sizes.append((int(frames.shape[1]), int(frames.shape[2])))
    return ValidationMaps(branch_maps, sizes)


def calibrate(
    fusion: Fusion,
    validation: ValidationMaps,
    config: FusionConfig,
    composition_calibrated: bool = False,
) -> tuple[float, np.ndarray]:
    """Each branch's statistics over all validation pixels (with ``merge="max"`` also over the
    image scores of its standardised map, :func:`~engine.max_merge.fit_image_stats`, and with
    ``background_quantile`` each branch's background scale,
    :func:`~engine.max_merge.fit_background_scales`), then the image-score threshold, all stored
    in ``fusion``.

    ``composition_calibrated``: the composition branch's scores are already standardised on
    these validation images (:meth:`CompositionModel.calibrate_groups`: fine parts, windows), so
    fusion takes them as they are (mean 0, std 1) instead of standardising them again: a second
    standardisation of the larger of two standardised scores would rescale it.

    Returns (threshold, validation image scores). The scores are maxima of the fused map at the
    original image size, exactly as the Runtime computes them.
    """
    inputs = validation.branch_maps
    chunks = [{b: chunk[b] for b in fusion.branches} for chunk in inputs]
    stats = {
        branch: BranchStats.fit(chunk[branch] for chunk in chunks) for branch in fusion.branches
    }
    as_is = {"composition": BranchStats(0.0, 1.0)} if composition_calibrated else {}
    stats |= {b: s for b, s in as_is.items() if b in stats}
    image_stats, backgrounds = None, None
    if fusion.merge == "max":
        image_stats = fit_image_stats(
            chunks, stats, fusion.sigma, config.image_scale, config.composition_scale
        )
        image_stats |= {b: s for b, s in as_is.items() if b in image_stats}
    if fusion.background_quantile is not None:
        assert image_stats is not None  # Fusion refuses the quantile without merge="max"
        backgrounds = fit_background_scales(
            chunks,
            stats,
            image_stats,
            fusion.weights,
            fusion.sigma,
            fusion.background_quantile,
            config.background_target,
        )
    fusion.calibrate(stats, image_stats, backgrounds)
    scores = [
        image_scores(resize_to(fusion(chunk), size))
        for chunk, size in zip(inputs, validation.sizes, strict=True)
    ]
    scores_np = torch.cat(scores).numpy()
    threshold = calibrate_threshold(scores_np, config.target_false_alarm_rate)
    fusion.set_threshold(threshold)
    return threshold, scores_np


def validation_branch_scores(
    detector: Detector, validation: ValidationMaps
) -> dict[str, np.ndarray]:
    """Each branch's validation image scores as :func:`~engine.evaluation.evaluate` scores a
    test image: the branch alone (standardised and blurred as in fusion), its maximum at the
    image's original size."""
    assert detector.stats is not None
    scores: dict[str, list[torch.Tensor]] = {branch: [] for branch in detector.branch_names}
    for chunk, size in zip(validation.branch_maps, validation.sizes, strict=True):
        maps = {branch: chunk[branch].to(detector.device) for branch in scores}
        for branch, alone in standardised_maps(maps, detector.stats, detector.fusion.sigma).items():
            scores[branch].append(image_scores(resize_to(alone, size)).cpu())
    return {branch: torch.cat(parts).double().numpy() for branch, parts in scores.items()}


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
    data_format: str = "auto",
    fusion_variants: Mapping[str, FusionConfig] | None = None,
) -> BuildResult:
    """Train, fit, calibrate, evaluate and export one category to ``out``.

    ``data_format`` names the layout of ``<data_root>/<category>`` (``auto``: detected, see
    :mod:`engine.data.formats`). Training checkpoints live in ``<out>.checkpoints/`` next to the
    artifact until the artifact is written, so an interrupted build resumes its training where
    it stopped, provided the data, weights, text prior and configs are unchanged (else
    ValueError); ``fresh`` discards them first. Outputs and every input file are checked, and
    what the test split can evaluate is decided, before any model is built; without test
    metrics the artifact is written all the same.

    ``fusion_variants`` (name -> fusion config; an accuracy-benchmark comparison): each is
    calibrated on the same validation maps and measured on the same test maps as
    ``fused[name]`` in the result's metrics and image scores, not in the artifact.
    """
    seconds: dict[str, float] = {}
    out = Path(out)
    maps_root = Path(save_maps) if save_maps is not None else None
    checkpoints = checkpoint_folder(out)
    check_config_bounds(config)
    check_outputs(out, maps_root)
    dataset = open_dataset(data_root, category, data_format)
    with _step(seconds, "validate inputs", verbose):
        validate_inputs(dataset, progress)
        check_training_images(dataset, config)
        check_index_kind(config.structural.index, device)
        data_digest = data_fingerprint(dataset)
        data_info = _data_info(dataset)
        if verbose:
            print(_data_lines(dataset, data_info), flush=True)
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
        fine_channels = None
        if config.composition.enabled:
            # Both refuse before training: the layout features, and the fine levels.
            structural.patch_features.check_layout()
            if config.composition.fine_parts:
                fine_channels = structural.patch_features.fine_channels()
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
            build_memory_bank(
                structural.patch_features, loader, config.structural, device, progress, features
            )
        )
        structural.to(device)
        index, params = config.structural.index, config.structural.index_params
        if index == "auto":  # takes no parameters of its own (StructuralModel.from_config)
            index = auto_index(device, *map(int, structural.bank.shape))
            params = auto_index_params(index)
        index_kind = attach_index(structural, index, device, params)
        if verbose:
            print(f"memory bank: {tuple(structural.bank.shape)}, search: {index_kind}", flush=True)

    positional = None
    if config.positional.enabled:
        with _step(seconds, "positional memory", verbose):
            rows = config.positional.memory_rows(int(features.shape[0]))
            positional = PositionalModel(config.positional, int(features.shape[-1]), grid, rows)
            positional.to(device).fit(features.to(device), grid)
        if verbose:
            h, w = config.positional.pooled_grid(grid)
            kept = "all" if rows == len(features) else f"k-center {rows} of {len(features)}"
            print(f"positional memory: {h} x {w} cells, training images per cell: {kept}")

    composition = None
    if config.composition.enabled:
        with _step(seconds, "composition model", verbose):
            own_size = config.composition.own_pass_size(config.structural.image_size)
            if own_size is not None:
                features, grid = extract_patch_features(
                    structural.patch_features, loader, device, progress, size=own_size
                )
            composition = CompositionModel(
                config.composition, int(features.shape[-1]), grid, fine_channels
            )
            composition.to(device).fit(structural.patch_features.layout(features), grid)
            if composition.fine is not None:
                side = StructuralSide(structural, composition)
                fit_fine_parts(
                    composition,
                    side.composition_features,
                    lambda: (
                        loader_images(batch).to(device)
                        for batch in tqdm(loader, "composition fine parts", disable=not progress)
                    ),
                    config.composition.seed,
                )
    del features
    detector = Detector(
        logical,
        structural,
        config.fusion,
        structural_size=config.structural.image_size,
        composition=composition,
        positional=positional,
    ).to(device)

    with _step(seconds, "calibrate on validation", verbose):
        grouped = composition is not None and composition.n_groups > 1
        if needs_calibration(composition):
            calibrate_composition(detector, dataset.samples("validation"), progress, verbose)
        validation = validation_maps(detector, dataset.samples("validation"), progress)
        threshold, val_scores = calibrate(detector.fusion, validation, config.fusion, grouped)
        val_branch_scores = validation_branch_scores(detector, validation) | {FUSED: val_scores}
        variants = {}
        for name, variant in (fusion_variants or {}).items():
            variants[name] = Fusion.from_config(
                variant, detector.branch_names, detector.map_size, config.composition
            )
            calibrate(variants[name], validation, variant, grouped)
            variants[name].to(device)
        del validation

    if dataset.samples("test"):
        with _step(seconds, "evaluate on test", verbose):
            evaluation = evaluate(detector, dataset, maps_root, progress, variants)
    else:
        evaluation = Evaluation({}, {}, [])
        if verbose:
            print("\n== evaluate on test: skipped, no test images", flush=True)
    metrics = evaluation.metrics

    with _step(seconds, "export artifact", verbose):
        info = {
            "category": category,
            "data": data_info,
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
                if branch in (*detector.branch_names, FUSED)
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
        data_info["format"],
        data_info["evaluation"],
        val_branch_scores,
    )


def _data_info(dataset: CategoryDataset) -> dict:
    """What the manifest records of the data: format, evaluation level, images per split."""
    return {
        "format": format_of(dataset),
        "evaluation": evaluation_level(dataset),
        "images": {split: len(dataset.samples(split)) for split in ("train", "validation")},
        "test_images": {
            "good": sum(not s.label for s in dataset.samples("test")),
            "anomalous": sum(s.label for s in dataset.samples("test")),
        },
    }


def _data_lines(dataset: CategoryDataset, info: dict) -> str:
    """The build's log lines on the data: layout, split sizes, the metrics it will report."""
    images = info["images"]
    return (
        f"[data] {dataset.path}: {FORMAT_NAMES[info['format']]} layout; "
        f"{images['train']} training, {images['validation']} validation images\n"
        f"[data] {evaluation_plan(dataset)}"
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
    """Log a warning when the weights kept (the best epoch's) have a collapsed level."""
    kept = [d for d in trained.diagnostics if d["epoch"] == trained.best_epoch]
    warning = collapse_warning(kept[0] if kept else logical_diagnostics(model, probe))
    if warning is not None:
        log.warning("%s", warning.removeprefix("WARNING: "))


__all__ = ["BuildResult", "build_category", "calibrate"]
