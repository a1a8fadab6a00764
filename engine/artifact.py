"""The deployment artifact: one folder, a sealed manifest, checksums, written atomically.

Layout (``FORMAT_VERSION`` 3)::

    <artifact>/
      manifest.json     format version, package versions, config, backbone and text-prior
                        identity, calibration, threshold, metrics, sha256 + size of every file,
                        and its own sha256 (see :mod:`engine.artifact_manifest`)
      logical.pt        LogicalModel state dict (frozen encoder included: the artifact is
                        self-contained and never needs $TORCH_HOME)
      structural.pt     StructuralModel state dict: frozen backbone, the patch projection (the
                        basis the bank is stored in) and the coreset memory bank
      index/            the kNN index, only when it is approximate (any FAISS index but Flat:
                        HNSW, IVF, PQ, ...): index.faiss (faiss.write_index), index.json (its
                        identity), bank.npy (the bank it indexes); exact FAISS or PyTorch search
                        is rebuilt from the bank at load time

Writing: assembled in a hidden sibling folder, fsynced and swapped into place atomically; only
an empty folder or an engine artifact is ever replaced (:mod:`engine.artifact_writer`).

Reading: the folder is opened once and every file is read through that handle, once, into
memory; those bytes are checked and deserialised, so a load during a rebuild sees one build or
fails, never a mix. The file set is exact, no file may be a link or leave the folder, and
every problem is an :class:`ArtifactError` saying what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine
from engine import artifact_files as fs
from engine.artifact_manifest import (
    COMPOSITION_FILE,
    FORMAT_VERSION,
    INDEX_FOLDER,
    LOGICAL_FILE,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    POSITIONAL_FILE,
    REBUILD,
    STRUCTURAL_FILE,
    ArtifactError,
    ManifestSpec,
    check_seal,
    expected_files,
    parse_json,
    parse_manifest,
    some_names,
    untrusted,
)
from engine.artifact_modules import check_materialised, empty_modules
from engine.artifact_writer import ArtifactWriter, check_target
from engine.calibrate import BranchStats
from engine.config import BuildConfig
from engine.detector import Detector
from engine.models.composition import CompositionModel
from engine.models.knn_index import KnnIndex, auto_index, is_approximate, restore_index
from engine.models.positional import PositionalModel
from engine.models.structural import attach_index
from engine.models.weights import contiguous_state

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "ArtifactError",
    "ArtifactWriter",
    "check_target",
    "load_artifact",
    "read_manifest",
    "save_artifact",
]

_VERSION_2_NOTE = (
    " (a version-2 artifact recomputes its structural projection at load, which can come out "
    "in another basis than its memory bank on a machine with another thread count)"
)


def _window_checks(composition: CompositionModel | None) -> dict[str, Any]:
    """What the manifest records of the composition branch's window sizes: each one's
    rearranged-layout AUROC on validation and whether it takes part in the score."""
    if composition is None or composition.windows is None:
        return {}
    return {
        "composition_windows": {
            "divisions": list(composition.config.windows),
            "rearranged_auroc": [round(float(a), 4) for a in composition.window_auroc],
            "used": [bool(u) for u in composition.group_used[1:]],
        }
    }


def save_artifact(
    path: str | Path, detector: Detector, config: BuildConfig, info: dict[str, Any]
) -> Path:
    """Write ``detector`` (weights, bank, calibration) and ``info`` (category, threshold, ...).

    The manifest is validated as the loader will read it before anything is written, so a
    build with e.g. a NaN threshold fails here instead of leaving an artifact that cannot load.
    """
    if detector.stats is None:
        raise ValueError("the detector is not calibrated: branch statistics are missing")
    index = detector.structural.index
    saved_index = index is not None and not index.exact
    composition, positional = detector.composition, detector.positional
    image_stats = detector.fusion.image_stats if detector.fusion.merge == "max" else None
    backgrounds = detector.fusion.backgrounds
    manifest = {
        "config": config.to_dict(),
        "backbones": {
            "logical": asdict(detector.logical.encoder.weights),
            "structural": asdict(detector.structural.patch_features.backbone.weights),
        },
        "calibration": _stats_json(detector.stats),
        "fusion_weights": dict(detector.weights),
        **({"image_calibration": _stats_json(image_stats)} if image_stats is not None else {}),
        **({"background_scales": backgrounds} if backgrounds is not None else {}),
        "structural_index": index.identity if index is not None else {"kind": "torch"},
        **({"composition_grid": list(composition.grid)} if composition is not None else {}),
        **_window_checks(composition),
        **({"positional_memory": _memory_shape(positional)} if positional is not None else {}),
        **info,
    }
    names = sorted(expected_files(saved_index, composition is not None, positional is not None))
    draft = {**manifest, "files": {n: {"sha256": "0" * 64, "bytes": 0} for n in names}}
    parse_manifest(json.loads(json.dumps(draft, default=str)), f"{path} (to be written)")
    with ArtifactWriter(path) as writer:
        torch.save(_cpu_state(detector.logical), writer.file(LOGICAL_FILE))
        torch.save(_cpu_state(detector.structural), writer.file(STRUCTURAL_FILE))
        if composition is not None:
            torch.save(_cpu_state(composition), writer.file(COMPOSITION_FILE))
        if positional is not None:
            torch.save(_cpu_state(positional), writer.file(POSITIONAL_FILE))
        if saved_index:
            index.save(writer.file(INDEX_FOLDER))
        return writer.commit(manifest)


def _memory_shape(positional: PositionalModel) -> dict[str, Any]:
    return {"grid": list(positional.grid), "images": int(positional.memory.shape[0])}


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The validated manifest of the artifact at ``path``; with ``verify`` every file's sha256
    is checked too (sizes, the exact file set and the manifest's own checksum always are).

    Raises:
        ArtifactError: not a folder, no manifest (incomplete build), unreadable or malformed
            manifest, another format version, a missing, extra, linked or unsafe file, or a
            checksum mismatch.
    """
    manifest, _, _ = _read_artifact(Path(path), verify, load=False)
    return manifest


def _stats_json(stats: dict[str, BranchStats]) -> dict[str, dict[str, float]]:
    return {branch: asdict(values) for branch, values in stats.items()}


def load_artifact(
    path: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[Detector, dict[str, Any]]:
    """The calibrated :class:`Detector` on ``device`` and the manifest of the artifact at ``path``.

    Every file is read once; with ``verify`` those bytes are hashed, and the same bytes are
    deserialised. The backbones are rebuilt empty and filled from the artifact, so loading
    never needs ``$TORCH_HOME`` or any download. Raises :class:`ArtifactError` on any problem
    with the artifact, including NaN or infinite weights or memory bank.
    """
    root = Path(path)
    manifest, spec, blobs = _read_artifact(root, verify, load=True)
    # pop: the bytes are not needed once deserialised (they would double the peak memory).
    members = (LOGICAL_FILE, STRUCTURAL_FILE) + (
        (COMPOSITION_FILE,) if spec.composition_grid is not None else ()
    )
    members += (POSITIONAL_FILE,) if spec.positional_memory is not None else ()
    states = {name: _state_dict(root / name, blobs.pop(name)) for name in members}
    sc = spec.config.structural
    with untrusted(f"{root}: the weights do not fit the model the manifest describes"):
        logical, structural, composition, positional = empty_modules(spec)
    bank_dim = structural.patch_features.out_dim
    _check_bank(root / STRUCTURAL_FILE, states[STRUCTURAL_FILE].get("bank"), bank_dim)
    with untrusted(f"{root}: the weights do not fit the model the manifest describes"):
        logical.load_state_dict(states[LOGICAL_FILE], assign=True)
        structural.load_state_dict(states[STRUCTURAL_FILE], assign=True)
        if composition is not None:
            composition.load_state_dict(states[COMPOSITION_FILE], assign=True)
        if positional is not None:
            positional.load_state_dict(states[POSITIONAL_FILE], assign=True)
        check_materialised(root, logical, structural)
    detector = Detector(
        logical,
        structural,
        spec.config.fusion,
        spec.stats,
        structural_size=sc.image_size,
        composition=composition,
        weights=spec.fusion_weights,
        image_stats=spec.image_stats,
        positional=positional,
        backgrounds=spec.backgrounds,
    ).to(device)
    detector.fusion.set_threshold(spec.threshold)
    # An approximate index that ``auto`` chose on a CPU gives way to exact search on CUDA.
    saved = is_approximate(spec.index) and not (
        sc.index == "auto" and auto_index(device) == "torch"
    )
    with untrusted(f"{root}: cannot set up the kNN index"):
        if saved:
            recorded = manifest["structural_index"]
            structural.use_index(_saved_index(root, blobs, recorded, spec.index, structural.bank))
        else:
            attach_index(structural, sc.index, device, sc.index_params)
    return detector, manifest


def _read_artifact(
    root: Path, verify: bool, load: bool
) -> tuple[dict[str, Any], ManifestSpec, dict[str, bytes]]:
    """Manifest, its validated spec and (with ``load``) every file's bytes, all read through one
    handle on the folder. A rebuild that swaps the folder meanwhile can make files vanish from
    under the handle; then, once, the new folder is read from the start."""
    for attempt in (0, 1):
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise ArtifactError(
                f"{root}: no artifact folder here ({error.strerror}; build one with "
                "`python -m engine.build`)"
            ) from error
        try:
            return _read_from(fd, root, verify, load)
        except ArtifactError:
            if attempt or not fs.replaced(root, fd):
                raise
        finally:
            os.close(fd)
    raise AssertionError("unreachable")


def _read_from(
    fd: int, root: Path, verify: bool, load: bool
) -> tuple[dict[str, Any], ManifestSpec, dict[str, bytes]]:
    where = root / MANIFEST
    try:
        handle = os.fdopen(fs.open_member(fd, MANIFEST), "rb")
    except FileNotFoundError as error:
        raise ArtifactError(
            f"{root}: no {MANIFEST}; this is not a complete artifact (interrupted build?)"
        ) from error
    except OSError as error:
        raise ArtifactError(f"{where}: {fs.explain_open_error(error)}") from error
    with handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: over {MAX_MANIFEST_BYTES} bytes, not an engine manifest")
    manifest = parse_json(data, str(where))
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: not an engine manifest (a JSON object is expected)")
    found = manifest.get("format_version")
    if type(found) is not int or found != FORMAT_VERSION:
        raise ArtifactError(
            f"{root}: artifact format version {found!r}, but this engine (v{engine.__version__}) "
            f"reads version {FORMAT_VERSION}{_VERSION_2_NOTE if found == 2 else ''}; {REBUILD}"
        )
    check_seal(data, manifest, str(where))
    spec = parse_manifest(manifest, str(where))
    try:
        unlisted = sorted(set(fs.entries(fd)) - set(spec.files) - {MANIFEST})
    except (OSError, RecursionError) as error:
        raise ArtifactError(f"{root}: cannot list the folder ({error})") from error
    if unlisted:
        raise ArtifactError(
            f"{root}: holds files its manifest does not list: {some_names(unlisted)}"
        )
    blobs = {}
    for name, entry in spec.files.items():
        blob = _read_member(fd, root / name, name, entry, verify, load)
        if load:
            blobs[name] = blob
    return manifest, spec, blobs


def _read_member(fd: int, path: Path, name: str, entry: Any, verify: bool, load: bool) -> bytes:
    """The bytes of listed file ``name`` (empty unless ``load``), checked against ``entry``."""
    mismatch = f"{path}: checksum mismatch (file changed or corrupted since the build); {REBUILD}"
    try:
        handle = os.fdopen(fs.open_member(fd, name), "rb")
    except OSError as error:
        raise ArtifactError(f"{path}: {fs.explain_open_error(error)}; {REBUILD}") from error
    with handle:
        if os.fstat(handle.fileno()).st_size != entry.size:
            raise ArtifactError(mismatch)
        if not (verify or load):
            return b""
        data = handle.read()
    if len(data) != entry.size or (verify and hashlib.sha256(data).hexdigest() != entry.sha256):
        raise ArtifactError(mismatch)
    return data if load else b""


def _state_dict(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    with untrusted(f"{path}: cannot be loaded"):
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not (
        isinstance(state, dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ArtifactError(f"{path}: not a state dict of named tensors; {REBUILD}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(
            f"{path}: NaN or infinite values in {some_names(bad)} (every score would be wrong); "
            f"{REBUILD}"
        )
    return contiguous_state(state)


def _check_bank(path: Path, bank: Any, dim: int) -> None:
    """Refuse a bank that is not a non-empty (M, dim) float tensor before any model is built."""
    ok = (
        isinstance(bank, torch.Tensor)
        and bank.dim() == 2
        and bank.shape[0] > 0
        and bank.shape[1] == dim
        and bank.dtype in (torch.float32, torch.float16)
    )
    if not ok:
        got = (tuple(bank.shape), bank.dtype) if isinstance(bank, torch.Tensor) else bank
        raise ArtifactError(
            f"{path}: the memory bank must be a non-empty (M, {dim}) float32 or float16 tensor "
            f"(the structural features' dimension), got {got}; {REBUILD}"
        )


def _saved_index(
    root: Path,
    blobs: dict[str, bytes],
    recorded: dict[str, Any],
    identity: dict[str, Any],
    bank: torch.Tensor,
) -> KnnIndex:
    """The saved approximate index, from the bytes already read and checked: ``recorded`` is
    the manifest's structural_index as written, ``identity`` in this version's form."""
    folder = root / INDEX_FOLDER
    if parse_json(blobs[f"{INDEX_FOLDER}/index.json"], str(folder / "index.json")) != recorded:
        raise ArtifactError(f"{folder / 'index.json'} differs from the manifest's structural_index")
    vectors = np.load(io.BytesIO(blobs[f"{INDEX_FOLDER}/bank.npy"]), allow_pickle=False)
    if vectors.dtype != np.float32 or not np.array_equal(vectors, bank.float().cpu().numpy()):
        raise ArtifactError(f"{folder / 'bank.npy'} is not the memory bank of {STRUCTURAL_FILE}")
    try:
        return restore_index(identity, vectors, blobs[f"{INDEX_FOLDER}/index.faiss"])
    except ValueError as error:
        raise ArtifactError(f"{folder / 'index.faiss'}: {error}") from error
