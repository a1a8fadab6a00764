"""The modules an artifact's manifest describes, built empty for its weights.

The backbones are built on the meta device (a random initialisation of a 100-layer net costs
seconds and would be overwritten anyway) and materialised by ``load_state_dict(assign=True)``;
:func:`check_materialised` then proves nothing was left without a value.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.artifact_manifest import ArtifactError, ManifestSpec
from engine.models.backbones import load_backbone
from engine.models.composition import CompositionModel
from engine.models.logical import LogicalModel
from engine.models.positional import PositionalModel
from engine.models.structural import PatchFeatures, StructuralModel


def empty_modules(
    spec: ManifestSpec,
) -> tuple[LogicalModel, StructuralModel, CompositionModel | None, PositionalModel | None]:
    """The modules the manifest describes, to be filled with ``load_state_dict(assign=True)``;
    the backbones on the meta device."""

    def backbone(branch: str, levels: tuple[str, ...]):
        info = spec.weights[branch]
        with torch.device("meta"):
            extractor = load_backbone(info.arch, levels, "random", allow_random=True, verbose=False)
        extractor.weights = info
        return extractor

    lc, sc = spec.config.logical, spec.config.structural
    embedding = None if spec.text_dim is None else torch.zeros(spec.text_dim)
    logical = LogicalModel(
        lc, backbone("logical", (*lc.compared_levels, lc.bottleneck_level)), embedding
    )
    features = PatchFeatures(
        backbone("structural", sc.levels),
        sc.feature_dim,
        sc.patch_size,
        sc.compact_features,
        sc.grid_level,
    )
    structural = StructuralModel(features, density_k=sc.density_k)
    composition = None
    if spec.composition_grid is not None:
        cc = spec.config.composition
        fine_channels = features.fine_channels() if cc.fine_parts else None
        composition = CompositionModel(cc, features.out_dim, spec.composition_grid, fine_channels)
    positional = None
    if spec.positional_memory is not None:
        grid, rows = spec.positional_memory
        positional = PositionalModel(spec.config.positional, features.out_dim, grid, rows)
    return logical, structural, composition, positional


def check_materialised(root: Path, *modules: torch.nn.Module) -> None:
    """Every parameter and buffer was filled from the artifact: none is left on the meta device."""
    for module in modules:
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.is_meta:
                raise ArtifactError(f"{root}: the artifact's weights have no value for {name}")
