"""Checks a build runs before any work: outputs it may write, the kNN index, every input file,
and the fingerprint a resumed training must match.

Everything here runs without a model, so bad input or a bad output path fails in seconds and
leaves nothing behind: no checkpoints, no maps, no artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from engine import artifact as artifact_module
from engine.config import BuildConfig
from engine.data.formats import CategoryDataset
from engine.data.images import read_image_size, read_rgb
from engine.data.types import MIN_VALIDATION_IMAGES, DatasetError
from engine.models.composition import MIN_TRAINING_IMAGES
from engine.models.knn_index import faiss_available, faiss_gpu_available
from engine.models.weights import WeightsInfo, file_sha256
from engine.train import check_checkpoint_dir

__all__ = [
    "check_index_kind",
    "check_output_folder",
    "check_outputs",
    "check_training_images",
    "checkpoint_folder",
    "data_fingerprint",
    "training_fingerprint",
    "validate_inputs",
]


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
    """Raise RuntimeError when the structural kNN index ``kind`` (``structural.index``: a FAISS
    factory string or one of :data:`engine.models.knn_index.CHOICES`) cannot run on this machine.

    Its spelling is checked with the config, and whether it fits the features and its
    parameters by :meth:`engine.models.structural.StructuralModel.from_config`: both before
    any training.
    """
    if kind not in ("auto", "torch") and not faiss_available():
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


def validate_inputs(dataset: CategoryDataset, progress: bool) -> None:
    """Check every file the build reads, before any training, so bad input costs no work.

    Every image header (readable, within Pillow's pixel limit), one image size per validation
    and test split (inference batches need it), every test image decoded in full (training and
    validation images are decoded before training anyway), at least ``MIN_VALIDATION_IMAGES``
    validation images, every ground-truth mask read and
    matched to ``defects_config.json`` (LOCO) and to its image's size with a positive sPRO
    saturation area. A test split may be empty or hold no anomaly: what it can evaluate is
    :func:`engine.data.formats.evaluation_level`. Raises DatasetError naming the file.
    """
    for split in ("train", "validation"):
        if not dataset.samples(split):
            raise DatasetError(f"{dataset.path / split}: no images")
    validation = dataset.samples("validation")
    if len(validation) < MIN_VALIDATION_IMAGES:
        raise DatasetError(
            f"{validation[0].image_path.parent}: {len(validation)} validation image; calibration "
            f"needs at least {MIN_VALIDATION_IMAGES}"
        )
    for sample in dataset.samples("train"):
        read_image_size(sample.image_path)
    dataset.image_size("validation")
    test = dataset.samples("test")
    if test:
        dataset.image_size("test")
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


def check_training_images(dataset: CategoryDataset, config: BuildConfig) -> None:
    """Raise DatasetError when the branches ``config`` turns on need more training images than
    ``dataset`` holds, before any training spends minutes on them."""
    train = dataset.samples("train")
    if config.composition.enabled and len(train) < MIN_TRAINING_IMAGES:
        raise DatasetError(
            f"{train[0].image_path.parent}: {len(train)} training image; the composition branch "
            f"needs at least {MIN_TRAINING_IMAGES} (add good images, or turn the branch off "
            "with --set composition.enabled=false)"
        )


def data_fingerprint(dataset: CategoryDataset) -> str:
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


def training_fingerprint(
    data_digest: str, weights: WeightsInfo, text_identity: dict
) -> dict[str, str]:
    """What a resumed training must find unchanged besides the configs: the data
    (:func:`data_fingerprint`), the encoder's weights and the text prior."""
    return {
        "data": data_digest,
        "weights": _weights_digest(weights),
        "text prior": _digest(text_identity),
    }
