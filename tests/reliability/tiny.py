"""Tiny real artifacts for artifact tests, made through the public API in about a second.

Random-weight ResNet-18 stems (two levels), a 32 px logical module with one small decoder
stage and a 16-entry memory bank: every file of a real artifact, a few MB in all. Test modules
load this file with ``runpy.run_path`` (tests are not a package).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.artifact import load_artifact, save_artifact
from engine.calibrate import BranchStats
from engine.config import BuildConfig
from engine.detector import Detector, StructuralSide
from engine.models.composition import CompositionConfig, CompositionModel
from engine.models.composition.fine import fit_fine_parts
from engine.models.logical import LogicalConfig, LogicalModel
from engine.models.positional import PositionalConfig, PositionalModel
from engine.models.structural import (
    StructuralConfig,
    StructuralModel,
    attach_index,
    resize_input,
)

SIZE = 32
FEATURE_DIM = 8


def tiny_config(
    index: str = "torch",
    params: str = "",
    levels: tuple[str, ...] = ("layer1",),
    grid_level: str | None = None,
) -> BuildConfig:
    logical = LogicalConfig(
        backbone="resnet18",
        compared_levels=("layer1",),
        bottleneck_level="layer2",
        image_size=SIZE,
        codebook_size=4,
        codebook_dim=8,
        learned_text_dim=8,
        context_dim=4,
        fusion_width=8,
        lewin_window=2,
        lewin_depth=1,
        lewin_head_dim=4,
        decoder_blocks=(1,),
    )
    structural = StructuralConfig(
        backbone="resnet18",
        levels=levels,
        grid_level=grid_level,
        image_size=SIZE,
        feature_dim=FEATURE_DIM,
        index=index,
        index_params=params,
    )
    return BuildConfig(
        preset="cpu",
        logical=logical,
        structural=structural,
        weights="random",
        allow_random=True,
        text_prior="learned",
    )


def tiny_detector(
    seed: int = 0,
    index: str = "torch",
    params: str = "",
    bank_rows: int | None = None,
    levels: tuple[str, ...] = ("layer1",),
    grid_level: str | None = None,
) -> tuple[Detector, BuildConfig]:
    """A calibrated detector with random weights, searching with ``structural.index=index``
    (``index_params=params``) on a ``bank_rows``-row bank (default 64, or 16 for ``torch``).
    An approximate index (``"HNSW32"``, ``"IVF2,PQ2x4"``, ...) makes the artifact hold
    ``index/`` files. ``levels``: the memory bank's backbone levels (``("layer1", "layer2")``
    reaches what the composition branch's fine parts read; ``grid_level`` the grid they lie on)."""
    torch.manual_seed(seed)
    config = tiny_config(index, params, levels, grid_level)
    logical = LogicalModel.build(config.logical, None, "random", True, verbose=False)
    structural = StructuralModel.from_config(config.structural, "random", True, verbose=False)
    rows = bank_rows or (16 if index == "torch" else 64)
    structural.set_bank(torch.randn(rows, FEATURE_DIM))
    attach_index(structural, config.structural.index, "cpu", config.structural.index_params)
    stats = {"logical": BranchStats(0.1, 0.5), "structural": BranchStats(0.2, 0.25)}
    detector = Detector(logical, structural, config.fusion, stats, structural_size=SIZE)
    return detector, config


def with_composition(
    detector: Detector,
    config: BuildConfig,
    own_size: int,
    fine_parts: bool = False,
    windows: tuple[int, ...] = (),
    absence_sigma: float | None = None,
) -> Detector:
    """``detector`` with a composition branch fitted (on random images) at its own input size
    ``own_size`` (``CompositionConfig.image_size``), calibrated like the other branches; with
    ``fine_parts`` (the detector's levels must reach ``layer2``) its fine parts fitted, with
    ``fine_parts`` or ``windows`` its groups and with ``absence_sigma`` its absence map
    calibrated on more random images."""
    features = detector.structural.patch_features
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        train, grid = features(resize_input(images, own_size))
    composition_config = CompositionConfig(
        enabled=True,
        image_size=own_size,
        n_components=2,
        pca_dim=4,
        fit_patches=200,
        fine_parts=fine_parts,
        windows=windows,
        absence_sigma=absence_sigma,
    )
    fine_channels = features.fine_channels() if fine_parts else None
    composition = CompositionModel(composition_config, features.out_dim, grid, fine_channels)
    composition.fit(train, grid)
    side = StructuralSide(detector.structural, composition)
    with torch.no_grad():
        if fine_parts:
            fit_fine_parts(composition, side.composition_features, lambda: [images], seed=0)
        if composition_config.groups_calibrated:
            more = torch.randn(4, 3, SIZE, SIZE, generator=generator)
            checks = torch.ones(len(windows)) if windows else None  # every window size used
            composition.calibrate_groups(side.composition_distances(more), checks)
        if absence_sigma is not None:
            more = torch.randn(4, 3, SIZE, SIZE, generator=generator)
            features, grid, _ = side.composition_features(more)
            assert composition.absence is not None
            composition.absence.calibrate(composition.absence_peaks(features, grid))
    assert detector.stats is not None
    return Detector(
        detector.logical,
        detector.structural,
        config.fusion,
        detector.stats | {"composition": detector.stats["logical"]},
        structural_size=SIZE,
        composition=composition,
    )


# A positional memory for the tiny 8 x 8 grid: pooled to 4 x 4, one cell of tolerance.
TINY_POSITIONAL = PositionalConfig(enabled=True, pool=2, radius=1, dims=4)


def composed(
    levels: tuple[str, ...] = ("layer1",), **composition: Any
) -> tuple[Detector, BuildConfig]:
    """``tiny_detector(0, levels=levels)`` with a composition branch (:func:`with_composition`
    at the detector's own size, ``composition`` its options) and the config that describes it."""
    detector, config = tiny_detector(0, levels=levels)
    detector = with_composition(detector, config, SIZE, **composition)
    assert detector.composition is not None
    return detector, replace(config, composition=detector.composition.config)


def frames(n: int = 2) -> torch.Tensor:
    """``n`` seeded random (40, 50) RGB uint8 frames, channels last."""
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 40, 50, 3), dtype=torch.uint8, generator=generator)


def with_positional(
    detector: Detector, config: BuildConfig, positional_config: PositionalConfig = TINY_POSITIONAL
) -> tuple[Detector, BuildConfig]:
    """``detector`` with a positional memory fitted on five random images and calibrated like
    the other branches, and ``config`` with that branch enabled (what its manifest records)."""
    features = detector.structural.patch_features
    images = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train, grid = features(images)
    rows = positional_config.memory_rows(len(images))
    positional = PositionalModel(positional_config, features.out_dim, grid, rows)
    positional.fit(train, grid)
    assert detector.stats is not None
    positional_stats = BranchStats(1.0, 0.5)
    detector = Detector(
        detector.logical,
        detector.structural,
        config.fusion,
        detector.stats | {"positional": positional_stats},
        structural_size=SIZE,
        composition=detector.composition,
        positional=positional,
    )
    return detector, replace(config, positional=positional_config)


def info(threshold: float = 1.5, marker: str = "A") -> dict:
    """What a build adds to the manifest (a subset of the real build's keys)."""
    return {
        "category": "tiny",
        "marker": marker,
        "threshold": threshold,
        "text_prior": {"kind": "learned", "prompt": "tiny", "dim": None},
        "validation_scores": [0.5, 1.0, 1.25],
        "metrics": {"fused": {"image_auroc": {"mean": 0.5}}},
    }


def save(path: Path, detector: Detector, config: BuildConfig, **kwargs) -> Path:
    return save_artifact(path, detector, config, info(**kwargs))


def fingerprint(detector: Detector) -> tuple[float, float]:
    """Sums of the logical decoder's weights and of the memory bank: which build it holds."""
    decoder = detector.logical.decoder.parameters()
    logical = sum(float(p.detach().double().sum()) for p in decoder)
    return round(logical, 6), round(float(detector.structural.bank.double().sum()), 6)


def rebuilt(detector: Detector, seed: int) -> Detector:
    """``detector`` with other decoder weights and another bank (a second build, cheaply)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in detector.logical.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    bank = detector.structural.bank
    detector.structural.set_bank(torch.randn(bank.shape, generator=generator))
    return detector


def check_loads(path: Path) -> tuple[dict, tuple[float, float]]:
    """Load ``path`` and score one frame; the manifest and the weights' fingerprint."""
    detector, manifest = load_artifact(path)
    maps = detector(torch.zeros(1, 40, 50, 3, dtype=torch.uint8))
    assert maps.fused is not None and torch.isfinite(maps.fused).all()
    return manifest, fingerprint(detector)


SEAL = "manifest_sha256"
_SEALED = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')


def reseal(data: bytes) -> bytes:
    """Edited manifest bytes with their ``manifest_sha256`` recomputed as documented: the sha256
    of the file with that value replaced by 64 zeros."""
    found = _SEALED.search(data)
    assert found is not None
    unsealed = data[: found.start(1)] + b"0" * 64 + data[found.end(1) :]
    digest = hashlib.sha256(unsealed).hexdigest().encode()
    return unsealed[: found.start(1)] + digest + unsealed[found.end(1) :]


def write_manifest(path: Path, manifest: dict) -> None:
    """Replace the manifest of the artifact at ``path`` by ``manifest``, sealed as a build does."""
    body = {**manifest, SEAL: "0" * 64}
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    (path / "manifest.json").write_bytes(reseal(text.encode()))


def edit_manifest(path: Path, edit: Callable[[dict], Any]) -> dict:
    """Apply ``edit`` to the manifest at ``path`` in place and write it back, sealed."""
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    write_manifest(path, manifest)
    return manifest


def relist(path: Path, name: str) -> None:
    """List the current bytes of ``path / name`` in the manifest (after replacing them)."""
    data = (path / name).read_bytes()
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    edit_manifest(path, lambda m: m["files"].__setitem__(name, entry))
