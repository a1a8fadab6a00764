"""The deployment artifact: one folder, a manifest, checksums, written atomically.

Layout (``FORMAT_VERSION`` 1)::

    <artifact>/
      manifest.json     format version, package versions, config, backbone and text-prior
                        identity, calibration, threshold, metrics, sha256 + size of every file
      logical.pt        LogicalModel state dict (frozen encoder included: the artifact is
                        self-contained and never needs $TORCH_HOME)
      structural.pt     StructuralModel state dict: frozen backbone and the coreset memory bank
      index/            the kNN index, only when it is approximate (IVF-PQ); exact FAISS or
                        PyTorch search is rebuilt from the bank at load time

The folder is assembled in a hidden sibling temp folder and renamed into place only after the
manifest, written last, is on disk. A crash mid-build leaves at most a ``.<name>.tmp-*`` folder
that never loads; an existing artifact of the same name is replaced only by a complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import engine
from engine.calibrate import BranchStats
from engine.config import BuildConfig
from engine.detector import Detector
from engine.models.backbones import load_backbone
from engine.models.logical import LogicalModel
from engine.models.structural import PatchFeatures, StructuralModel, attach_index
from engine.models.weights import WeightsInfo, file_sha256

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, from another format version, or fails its checksums."""


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the artifact depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"engine": engine.__version__}
    for name in ("torch", "torchvision", "numpy", "faiss-cpu", "triton", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactWriter:
    """Build an artifact in a temp folder; :meth:`commit` makes it appear atomically.

    Use as a context manager: leaving the block without :meth:`commit` (an exception, Ctrl-C)
    deletes the temp folder and leaves any existing artifact at ``path`` untouched.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        )
        self._committed = False

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def file(self, name: str) -> Path:
        """Path inside the staging folder for a file the caller writes itself."""
        target = self.staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Checksum every staged file, write the manifest last, then swap the folder into place."""
        files = {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                files[rel] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        full = {
            "format_version": FORMAT_VERSION,
            "created_unix": time.time(),
            "package_versions": package_versions(),
            **manifest,
            "files": files,
        }
        manifest_path = self.staging / MANIFEST
        with open(manifest_path, "w") as f:
            json.dump(full, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.staging)

        backup = None
        if self.path.exists():
            backup = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, backup)
        os.replace(self.staging, self.path)
        _fsync_dir(self.path.parent)
        self._committed = True
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.path


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load and check an artifact's manifest; with ``verify`` every file's sha256 is checked.

    Raises:
        ArtifactError: not a folder, no manifest (incomplete build), unreadable manifest,
            another format version, a listed file missing, or a checksum mismatch.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(
            f"{root}: no artifact folder here (build one with `python -m engine.build`)"
        )
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{root}: no {MANIFEST}; this is not a complete artifact (interrupted build?)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise ArtifactError(f"{manifest_path}: not an engine manifest")
    found = manifest.get("format_version")
    if found != FORMAT_VERSION:
        raise ArtifactError(
            f"{root}: artifact format version {found!r}, but this engine (v{engine.__version__}) reads "
            f"version {FORMAT_VERSION}; rebuild it with `python -m engine.build`"
        )
    if verify:
        for name, meta in manifest["files"].items():
            p = root / name
            if not p.is_file():
                raise ArtifactError(f"{p}: listed in the manifest but missing")
            if p.stat().st_size != meta["bytes"] or file_sha256(p) != meta["sha256"]:
                raise ArtifactError(
                    f"{p}: checksum mismatch (file changed or corrupted since the build)"
                )
    return manifest


LOGICAL_FILE = "logical.pt"
STRUCTURAL_FILE = "structural.pt"
INDEX_FOLDER = "index"  # only for approximate (IVF-PQ) indexes; exact ones are rebuilt


def save_artifact(
    path: str | Path, detector: Detector, config: BuildConfig, info: dict[str, Any]
) -> Path:
    """Write ``detector`` (weights, bank, calibration) and ``info`` (category, metrics, ...)."""
    if detector.logical_stats is None or detector.structural_stats is None:
        raise ValueError("the detector is not calibrated: branch statistics are missing")
    with ArtifactWriter(path) as writer:
        torch.save(_cpu_state(detector.logical), writer.file(LOGICAL_FILE))
        torch.save(_cpu_state(detector.structural), writer.file(STRUCTURAL_FILE))
        index = detector.structural.index
        if index is not None and index.kind == "faiss_ivfpq":
            index.save(writer.file(INDEX_FOLDER))
        manifest = {
            "config": config.to_dict(),
            "backbones": {
                "logical": asdict(detector.logical.encoder.weights),
                "structural": asdict(detector.structural.patch_features.backbone.weights),
            },
            "calibration": {
                "logical": asdict(detector.logical_stats),
                "structural": asdict(detector.structural_stats),
            },
            "structural_index": index.identity if index is not None else {"kind": "torch"},
            **info,
        }
        return writer.commit(manifest)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def load_artifact(
    path: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[Detector, dict[str, Any]]:
    """The calibrated :class:`Detector` on ``device`` and the manifest of the artifact at ``path``.

    The backbones are rebuilt empty and filled from the artifact, so loading never needs
    ``$TORCH_HOME`` or any download. Raises :class:`ArtifactError` on any problem.
    """
    root = Path(path)
    manifest = read_manifest(root, verify)
    try:
        config = BuildConfig.from_dict(manifest["config"])
        weights = {k: WeightsInfo(**_tuples(v)) for k, v in manifest["backbones"].items()}
        stats = {k: BranchStats(**v) for k, v in manifest["calibration"].items()}
        text = manifest["text_prior"]
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{root / MANIFEST}: malformed manifest ({error!r})") from error

    def backbone(kind: str, levels: tuple[str, ...]):
        extractor = load_backbone(
            weights[kind].arch, levels, "random", allow_random=True, verbose=False
        )
        extractor.weights = weights[kind]
        return extractor

    lc, sc = config.logical, config.structural
    embedding = None if text.get("dim") is None else torch.zeros(int(text["dim"]))
    logical = LogicalModel(
        lc, backbone("logical", (*lc.compared_levels, lc.bottleneck_level)), embedding
    )
    structural = StructuralModel(
        PatchFeatures(backbone("structural", sc.levels), sc.feature_dim, sc.patch_size)
    )
    for module, name in ((logical, LOGICAL_FILE), (structural, STRUCTURAL_FILE)):
        try:
            state = torch.load(root / name, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except (OSError, RuntimeError, ValueError) as error:
            raise ArtifactError(f"{root / name}: cannot be loaded ({error})") from error
    detector = Detector(
        logical,
        structural,
        config.fusion,
        stats["logical"],
        stats["structural"],
        structural_size=sc.image_size,
    ).to(device)
    saved_index = root / INDEX_FOLDER
    attach_index(structural, sc.index, device, saved_index if saved_index.is_dir() else None)
    return detector, manifest


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the tuples of a dataclass into lists; turn them back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
