"""Patch features of the memory bank (PatchCore's recipe), in compact coordinates.

Patch features (``PatchFeatures``), per backbone level:

1. 3x3 local aggregation: average over each patch's 3x3 neighbourhood (stride 1, zero padding
   counted, like PatchCore's zero-padded unfold);
2. projection of the channels to ``feature_dim`` by adaptive average pooling over channels
   (PatchCore's per-level ``MeanMapper``), then of the stacked levels to ``feature_dim`` again
   (PatchCore's ``Aggregator``). Both poolings are fixed linear maps, so they are folded into one
   (C_level, feature_dim) matrix per level and applied as a 1x1 projection (ONNX-exportable);
3. the coarser levels bilinearly upsampled (align_corners=False) to the finest grid and summed.
   With ``grid_level`` (beyond PatchCore) the grid is that level's instead: the finer levels
   are max-pooled onto it, so a stride-4 level adds its detail (a thin needle, a chip) without
   four times the patches, bank and search (docs/ACCURACY.md, ablation 21).

Because steps 1-3 are all linear, projecting before upsampling gives the same numbers as
PatchCore's order while upsampling only ``feature_dim`` channels.

Compact coordinates (``compact=True``, the default): every feature is a sum of the per-level
projections, so it lies in the column space of the stacked projection matrices, whose rank ``r``
is at most the backbone's total channel count (152 for EfficientNet-Lite0's layer2 + layer3,
against ``feature_dim`` 1024). Features are then given in an orthonormal basis of that space:
an isometry, so every distance (kNN, coreset, scores) is PatchCore's, while the bank, the kNN
and the 1x1 projection shrink by ``feature_dim / r``. When ``r == feature_dim`` (ResNeXt-101)
the features are PatchCore's coordinates unchanged.

The basis is not unique (the pooling matrices have repeated singular values, and LAPACK returns
a different basis of each repeated subspace with another thread count), so the projections are
buffers saved in the state dict: a memory bank is only meaningful in the basis it was built in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.backbones import FeatureExtractor

# The raw levels PatchFeatures.with_fine returns (strides 4 and 8), for the composition
# branch's fine parts.
FINE_LEVELS = ("layer1", "layer2")

__all__ = ["FINE_LEVELS", "PatchFeatures", "adaptive_pool_matrix", "column_basis"]


def adaptive_pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_in, n_out) matrix ``P`` with ``x @ P == F.adaptive_avg_pool1d(x, n_out)`` on the last dim."""
    matrix = torch.zeros(n_in, n_out, dtype=torch.float64)
    for j in range(n_out):
        start = (j * n_in) // n_out
        stop = -((-(j + 1) * n_in) // n_out)  # ceil
        matrix[start:stop, j] = 1.0 / (stop - start)
    return matrix.float()


def column_basis(matrix: torch.Tensor) -> torch.Tensor:
    """(D, r) orthonormal float64 basis of the column space of a (D, n) matrix, r its rank."""
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    rank = int((s > s[0] * 1e-9).sum())
    return u[:, :rank]


class PatchFeatures(nn.Module):
    """Frozen backbone -> locally aggregated, projected patch features on one level's grid.

    ``forward(x)`` takes (B, 3, S, S) normalised images and returns ``(features, (h, w))`` with
    features of shape (B, h*w, out_dim) in row-major grid order, (h, w) the grid level's grid.
    ``out_dim`` is ``feature_dim``, or with ``compact`` the rank of the feature space (module
    docstring); distances between features are the same either way. ``grid_level``: the level
    whose grid the features lie on (None: the finest); finer levels are max-pooled onto it.
    """

    basis: torch.Tensor | None
    layout_projection: torch.Tensor | None

    def __init__(
        self,
        backbone: FeatureExtractor,
        feature_dim: int = 1024,
        patch_size: int = 3,
        compact: bool = True,
        grid_level: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if (
            isinstance(patch_size, bool)
            or not isinstance(patch_size, int)
            or patch_size < 1
            or patch_size % 2 != 1
        ):
            raise ValueError(f"patch_size must be a positive odd int, got {patch_size!r}")
        levels = backbone.levels
        if grid_level is not None and grid_level not in levels:
            raise ValueError(f"grid_level must be None or one of {levels}, got {grid_level!r}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.patch_size = patch_size
        self.grid_level = grid_level or levels[0]
        stacked = adaptive_pool_matrix(len(levels) * feature_dim, feature_dim)
        folded = [  # per level, the (D, C_level) map from pooled channels to features
            (
                adaptive_pool_matrix(backbone.channels[level], feature_dim)
                @ stacked[i * feature_dim : (i + 1) * feature_dim]
            ).t()
            for i, level in enumerate(levels)
        ]
        # (feature_dim, out_dim): features are coordinates in this orthonormal basis; None when
        # they are PatchCore's own coordinates. Saved with the projections (module docstring).
        basis = column_basis(torch.cat(folded, dim=1)) if compact else None
        if basis is not None and basis.shape[1] < feature_dim:
            folded = [(basis.t() @ weight.double()).float() for weight in folded]
            self.register_buffer("basis", basis.float())
        else:
            self.register_buffer("basis", None)
        self.out_dim = int(folded[0].shape[0])
        for level, weight in zip(levels, folded, strict=True):
            # As an (out_dim, C, 1, 1) 1x1-convolution weight.
            self.register_buffer(f"projection_{level}", weight.contiguous()[:, :, None, None])
        self.detail_levels = levels[: levels.index(self.grid_level)]
        self.register_buffer("layout_projection", self._layout_projection(folded))

    def _layout_projection(self, folded: list[torch.Tensor]) -> torch.Tensor | None:
        """(out_dim, out_dim) linear map from a feature to its part from the levels at and above
        the grid level (the detail levels' part removed), or None when no level is finer than
        the grid or when the levels' projections overlap, so that the parts are not separable.

        Separable whenever the levels' channels together fit in the feature space (EfficientNet-
        Lite0: 24 + 40 + 112 = 176 coordinates): the feature is then a unique combination of the
        stacked projection columns, and the map keeps the coarse levels' share of it."""
        if not self.detail_levels:
            return None
        stacked = torch.cat([w.double() for w in folded], dim=1)  # (out_dim, sum of channels)
        if torch.linalg.matrix_rank(stacked) < stacked.shape[1]:
            return None
        n_detail = sum(w.shape[1] for w in folded[: len(self.detail_levels)])
        coefficients = torch.linalg.pinv(stacked)  # exact left inverse at full column rank
        return (stacked[:, n_detail:] @ coefficients[n_detail:]).float()

    def layout(self, features: torch.Tensor) -> torch.Tensor:
        """(..., out_dim) features -> the same without the levels finer than the grid: what the
        composition branch reads, so that its parts stay parts (the detail levels split them by
        texture; docs/ACCURACY.md, ablation 21). The features themselves when there are none."""
        if not self.detail_levels:
            return features
        self.check_layout()
        return features @ self.layout_projection.to(features.device, features.dtype).t()

    def check_layout(self) -> None:
        """ValueError when :meth:`layout` cannot separate the detail levels (checked by the build
        before training when the composition branch is on)."""
        if self.detail_levels and self.layout_projection is None:
            coarse = ",".join(n for n in self.backbone.levels if n not in self.detail_levels)
            raise ValueError(
                f"structural.grid_level={self.grid_level!r}: the levels {self.backbone.levels} "
                f"have more channels than the feature space holds, so the composition branch "
                f"cannot read the features without the finer levels {self.detail_levels}; "
                f"raise structural.feature_dim (each level needs feature_dim / number of levels "
                f"at least its channel count), leave the finer levels out "
                f"(structural.levels={coarse} structural.grid_level=null), or turn the "
                f"composition branch off"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self._aggregate(self.backbone(x))

    def with_fine(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """``forward``'s output and, from the same pass, the raw ``FINE_LEVELS`` maps (what
        :class:`engine.models.composition.fine.FineParts` reads)."""
        maps = self.backbone(x, extra=FINE_LEVELS)
        features, grid = self._aggregate(maps)
        return features, grid, (maps[FINE_LEVELS[0]], maps[FINE_LEVELS[1]])

    def fine_channels(self) -> tuple[int, int]:
        """The channel counts of the ``FINE_LEVELS`` maps :meth:`with_fine` returns; ValueError
        when the backbone does not reach the deeper of them."""
        built = tuple(self.backbone.stages)
        if not set(FINE_LEVELS) <= set(built):
            raise ValueError(
                f"composition.fine_parts reads the structural backbone's {FINE_LEVELS} maps, but "
                f"structural.levels {self.backbone.levels} build only {built}: use levels that "
                f"reach {FINE_LEVELS[-1]}, or turn fine_parts off"
            )
        probe = torch.zeros(1, 3, 32, 32, device=next(self.backbone.parameters()).device)
        with torch.no_grad():
            maps = self.backbone(probe, extra=FINE_LEVELS)
        return int(maps[FINE_LEVELS[0]].shape[1]), int(maps[FINE_LEVELS[1]].shape[1])

    def _aggregate(self, maps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = maps[self.grid_level].shape[-2:]
        total = None
        for level in self.backbone.levels:
            pooled = F.avg_pool2d(
                maps[level], self.patch_size, stride=1, padding=self.patch_size // 2
            )
            ratio = self.backbone.strides[self.grid_level] // self.backbone.strides[level]
            if ratio > 1:  # a finer level: each backbone channel's strongest response per cell
                pooled = F.max_pool2d(pooled, ratio, ceil_mode=True)
            projected = F.conv2d(pooled, getattr(self, f"projection_{level}"))
            if projected.shape[-2:] != grid:
                projected = F.interpolate(
                    projected, size=grid, mode="bilinear", align_corners=False
                )
            total = projected if total is None else total + projected
        assert total is not None
        h, w = int(grid[0]), int(grid[1])
        return total.flatten(2).transpose(1, 2), (h, w)
