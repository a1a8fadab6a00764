"""PatchCore-style structural module (paper §III-B): patch features, memory bank, kNN scores.

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

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine.models.backbones import FeatureExtractor, load_backbone
from engine.models.coreset import greedy_coreset
from engine.models.knn_compat import upgrade_spec
from engine.models.knn_index import KnnIndex, check_index_setting, make_index
from kernels import knn_min
from kernels.knn_args import bank_sq_norms

# The raw levels PatchFeatures.with_fine returns (strides 4 and 8), for the composition
# branch's fine parts.
FINE_LEVELS = ("layer1", "layer2")

__all__ = [
    "BANK_FLIPS",
    "PatchFeatures",
    "StructuralConfig",
    "StructuralModel",
    "adaptive_pool_matrix",
    "attach_index",
    "build_memory_bank",
    "coreset_bank",
    "extract_patch_features",
    "resize_input",
]

log = logging.getLogger(__name__)

# Flipped copies of the training images whose patches also enter the memory bank (image dims of
# a (B, 3, H, W) batch): "h" mirrors left-right, "v" top-bottom, "hv" adds both and the 180°
# turn. Flips keep the pixel grid and the aspect, so no interpolation enters the bank.
BANK_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": (),
    "h": ((3,),),
    "v": ((2,),),
    "hv": ((3,), (2,), (2, 3)),
}


@dataclass(frozen=True)
class StructuralConfig:
    """Structural module settings; defaults follow the paper / PatchCore (gap notes §3).

    ``index``: the memory-bank search, ``auto`` | ``torch`` | ``faiss_gpu`` | a FAISS factory
    string (``Flat``, ``HNSW32``, ``IVF256,Flat``, ``IVF1024,PQ64``, ...); ``index_params``: FAISS
    parameters such as ``efSearch=64`` or ``nprobe=32`` (see :mod:`engine.models.knn_index`).
    An old name (``faiss_hnsw``, ...) is replaced by its factory string, said in the log.
    """

    backbone: str = "resnext101_32x8d"
    levels: tuple[str, ...] = ("layer2", "layer3")
    grid_level: str | None = None  # None: the finest level's grid (PatchCore)
    image_size: int = 256
    patch_size: int = 3
    feature_dim: int = 1024
    compact_features: bool = True  # exact: see the module docstring
    coreset_ratio: float = 0.1
    coreset_projection_dim: int = 128
    coreset_seed: int = 0
    index: str = "auto"
    index_params: str = ""
    k: int = 1
    bank_dtype: str = "float32"
    bank_flips: str = "none"

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "feature_dim", "coreset_projection_dim", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StructuralConfig.{name} must be a positive int, got {value!r}")
        if self.patch_size % 2 == 0:
            raise ValueError(f"StructuralConfig.patch_size must be odd, got {self.patch_size}")
        if self.grid_level is not None and self.grid_level not in self.levels:
            raise ValueError(
                f"StructuralConfig.grid_level must be None (the finest level's grid) or one of "
                f"levels {self.levels}, got {self.grid_level!r}; with other levels set "
                f"structural.grid_level=null too"
            )
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(
                f"StructuralConfig.coreset_ratio must be in (0, 1], got {self.coreset_ratio}"
            )
        for name in ("index", "index_params"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"StructuralConfig.{name} must be a string, got {value!r}")
        object.__setattr__(self, "index", upgrade_spec(self.index))
        # Spelling only: whether the index fits the features' dimension and takes these
        # parameters is checked by StructuralModel.from_config (--set applies them one by one).
        check_index_setting(self.index, self.index_params)
        if self.bank_flips not in BANK_FLIPS:
            raise ValueError(
                f"StructuralConfig.bank_flips must be one of {tuple(BANK_FLIPS)}, "
                f"got {self.bank_flips!r}"
            )
        if self.bank_dtype not in ("float32", "float16"):
            raise ValueError(
                f"StructuralConfig.bank_dtype must be float32 or float16, got {self.bank_dtype!r}"
            )
        if self.k != 1:
            raise ValueError("StructuralConfig.k: only k=1 (PatchCore's score) is implemented")
        if not isinstance(self.compact_features, bool):
            raise ValueError(
                f"StructuralConfig.compact_features must be a bool, got {self.compact_features!r}"
            )


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
    """Frozen backbone -> locally aggregated, projected patch features on the finest level's grid.

    ``forward(x)`` takes (B, 3, S, S) normalised images and returns ``(features, (h, w))`` with
    features of shape (B, h*w, out_dim) in row-major grid order, (h, w) the finest level's grid.
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
        if self.layout_projection is None:
            raise ValueError(
                f"structural.grid_level={self.grid_level!r}: the levels {self.backbone.levels} "
                f"have more channels than the feature space holds, so the composition branch "
                f"cannot read the features without the finer levels {self.detail_levels}; "
                f"raise structural.feature_dim (each level needs feature_dim / number of levels "
                f"at least its channel count), or turn the composition branch off"
            )
        return features @ self.layout_projection.to(features.device, features.dtype).t()

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


def loader_images(batch: torch.Tensor | tuple | list) -> torch.Tensor:
    """The image tensor of a loader batch: a tensor, or the first item of ``(images, ...)``."""
    images = batch[0] if isinstance(batch, tuple | list) else batch
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(
            f"expected loader batches of (B, 3, S, S) images, got {getattr(images, 'shape', type(images))}"
        )
    return images


def resize_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, 3, size, size): bilinear with antialias, the input
    of a second patch-feature pass at another size (``CompositionConfig.image_size``). The
    normalisation is per-channel affine, so resizing after it equals resizing before it."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def extract_patch_features(
    patch_features: PatchFeatures,
    loader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = True,
    flip: tuple[int, ...] = (),
    size: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch features of every image the loader yields: (N_images, h*w, D) float32 on CPU, and
    the (h, w) grid they lie on. ``flip``: image dims to flip first (see :data:`BANK_FLIPS`);
    ``size``: resize the images to this side first (:func:`resize_input`)."""
    patch_features.to(device).eval()
    chunks, grid = [], (0, 0)
    for batch in tqdm(loader, desc="patch features", unit="batch", disable=not progress):
        images = loader_images(batch).to(device)
        if size is not None:
            images = resize_input(images, size)
        features, grid = patch_features(images.flip(flip) if flip else images)
        chunks.append(features.float().cpu())
    if not chunks:
        raise ValueError("the training loader yielded no images")
    return torch.cat(chunks), grid


def coreset_bank(
    features: torch.Tensor,
    cfg: StructuralConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, h*w, D) training patch features reduced to ``cfg.coreset_ratio`` of the patches by
    greedy coreset: the (M, D) bank on CPU in ``cfg.bank_dtype``. ``basis``: the
    :attr:`PatchFeatures.basis` of compact features (the picks are then the full features')."""
    flat = features.reshape(-1, features.shape[-1])
    picks = greedy_coreset(
        flat,
        ratio=cfg.coreset_ratio,
        projection_dim=cfg.coreset_projection_dim,
        seed=cfg.coreset_seed,
        device=device,
        progress=progress,
        basis=basis,
    )
    return flat[picks.cpu()].to(getattr(torch, cfg.bank_dtype))


def build_memory_bank(
    patch_features: PatchFeatures,
    loader: Iterable,
    cfg: StructuralConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features of all training images and of their flipped copies (``cfg.bank_flips``),
    reduced by :func:`coreset_bank`. ``features``: the loader's unflipped (N, h*w, D) patch
    features, when the caller has already extracted them."""
    if features is None:
        features, _ = extract_patch_features(patch_features, loader, device, progress)
    flipped = [
        extract_patch_features(patch_features, loader, device, progress, flip=dims)[0]
        for dims in BANK_FLIPS[cfg.bank_flips]
    ]
    if flipped:
        features = torch.cat([features, *flipped])
    return coreset_bank(features, cfg, device, progress, patch_features.basis)


class StructuralModel(nn.Module):
    """Patch features + memory bank; scores are Euclidean distances to the nearest bank entry.

    ``forward(x)`` on (B, 3, S, S) returns (B, h, w) patch scores; ``anomaly_map(x)`` returns
    (B, S, S), bilinearly upsampled (align_corners=False, PatchCore). Search is
    :func:`kernels.knn_min` against the registered ``bank`` buffer (export-safe; Triton on CUDA),
    unless :meth:`use_index` installed a FAISS index (see :func:`attach_index`).
    """

    def __init__(self, patch_features: PatchFeatures, bank: torch.Tensor | None = None) -> None:
        super().__init__()
        self.patch_features = patch_features
        self.register_buffer("bank", torch.empty(0, patch_features.out_dim))
        self.register_buffer("bank_sq", torch.empty(0), persistent=False)
        # The bank cast for a lower-precision search (see set_search_dtype), with its norms.
        self.register_buffer("search_bank", None, persistent=False)
        self.register_buffer("search_bank_sq", None, persistent=False)
        self.search_dtype: torch.dtype | None = None
        self.index: KnnIndex | None = None
        if bank is not None:
            self.set_bank(bank)

    @classmethod
    def from_config(
        cls,
        cfg: StructuralConfig,
        weights: str = "auto",
        allow_random: bool = False,
        verbose: bool = True,
    ) -> StructuralModel:
        """The model ``cfg`` describes, without a bank; ValueError, before any work, when
        ``cfg.index`` with ``cfg.index_params`` cannot index its features."""
        backbone = load_backbone(cfg.backbone, cfg.levels, weights, allow_random, verbose)
        features = PatchFeatures(
            backbone, cfg.feature_dim, cfg.patch_size, cfg.compact_features, cfg.grid_level
        )
        check_index_setting(cfg.index, cfg.index_params, features.out_dim)
        return cls(features)

    def set_bank(self, bank: torch.Tensor) -> None:
        """Install an (M, D) float32 or float16 bank (kept in its dtype, on the model's device);
        D is the features' ``out_dim``."""
        d = self.patch_features.out_dim
        if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] != d:
            raise ValueError(f"the bank must be (M, {d}) with M > 0, got {tuple(bank.shape)}")
        if bank.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the bank must be float32 or float16, got {bank.dtype}")
        if not torch.isfinite(bank).all():
            raise ValueError("the bank contains NaN or infinite values")
        device = self.bank.device
        self.bank = bank.detach().to(device).contiguous()
        self.bank_sq = bank_sq_norms(self.bank)
        self.set_search_dtype(self.search_dtype)

    def set_search_dtype(self, dtype: torch.dtype | None) -> None:
        """Search the bank buffer in ``dtype`` (a cast copy of the bank; queries are cast to it,
        distances still accumulate in float32); None searches the bank in its stored dtype.
        FAISS indexes always search in float32."""
        self.search_dtype = dtype
        if dtype is None or dtype == self.bank.dtype:
            self.search_bank = self.search_bank_sq = None
        else:
            self.search_bank = self.bank.to(dtype)
            self.search_bank_sq = bank_sq_norms(self.search_bank)

    def fit(
        self,
        train_loader: Iterable,
        cfg: StructuralConfig,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> StructuralModel:
        """Build the memory bank from ``train_loader`` (see :func:`build_memory_bank`)."""
        self.set_bank(build_memory_bank(self.patch_features, train_loader, cfg, device, progress))
        return self

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        # The bank size is data dependent: resize the empty buffer before loading into it.
        bank = state_dict.get(prefix + "bank")
        if bank is not None:
            self.bank = torch.empty_like(bank, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if bank is not None:
            self.bank_sq = bank_sq_norms(self.bank)
            self.set_search_dtype(self.search_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, grid = self.patch_features(x)
        return self.score_features(features, grid)

    def score_features(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D) patch features on an (h, w) grid -> (B, h, w) nearest-bank distances."""
        if self.bank.shape[0] == 0:
            raise RuntimeError("StructuralModel has no memory bank: call fit() or set_bank() first")
        flat = features.reshape(-1, features.shape[-1])
        if self.index is not None:
            dist = self.index.search(flat.float(), 1)[0][:, 0]
        else:
            lowered = self.search_bank is not None
            bank = self.search_bank if lowered else self.bank
            bank_sq = self.search_bank_sq if lowered else self.bank_sq
            dist, _ = knn_min(flat.to(bank.dtype), bank, bank_sq=bank_sq)
        return dist.reshape(features.shape[0], grid[0], grid[1])

    def map_from_features(
        self, features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        """Patch scores of ``features`` upsampled to ``size`` (the input's (S, S)): (B, S, S)."""
        scores = self.score_features(features, grid)
        return F.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def use_index(self, index: KnnIndex | None) -> None:
        """Search ``index`` (built on this model's bank) instead of the bank buffer; None resets."""
        self.index = index

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, S, S) patch scores, bilinearly upsampled."""
        features, grid = self.patch_features(x)
        return self.map_from_features(features, grid, (int(x.shape[-2]), int(x.shape[-1])))


def attach_index(
    model: StructuralModel, spec: str, device: str | torch.device, params: str = ""
) -> str:
    """Build the kNN index ``spec`` with FAISS parameters ``params`` (resolved for ``device``,
    see :func:`engine.models.knn_index.make_index`) on ``model``'s bank and search it; returns
    the spec used (``torch``: the bank buffer is searched directly, no index object).

    An approximate index is said in the log: it can miss the nearest bank row.
    """
    if model.bank.shape[0] == 0:
        raise RuntimeError("attach_index needs a memory bank: call fit() or set_bank() first")
    index = make_index(spec, device, params)
    if index.spec == "torch":
        model.use_index(None)
        return index.spec
    index.add(model.bank.float().cpu())
    if not index.exact:
        log.warning(
            "structural.index=%r (%s) is approximate: a search can miss the nearest bank row, "
            "which raises that patch's score (recall and accuracy: docs/PERFORMANCE.md)",
            index.spec,
            index.identity["params"] or "no parameters",
        )
    model.use_index(index)
    return index.spec
