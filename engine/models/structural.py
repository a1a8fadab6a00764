"""PatchCore-style structural module (paper §III-B): patch features, memory bank, kNN scores.

Patch features: :mod:`engine.models.patch_features`. The memory bank is a greedy coreset of
the training images' patch features; a patch scores its distance to the nearest bank row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine.models.backbones import load_backbone
from engine.models.bank_density import row_scales
from engine.models.coreset import coreset_size, gather_rows, greedy_coreset
from engine.models.knn_compat import upgrade_spec
from engine.models.knn_index import KnnIndex, check_index_setting, make_index
from engine.models.patch_features import (
    PatchFeatures,
    adaptive_pool_matrix,
)
from kernels import knn_min
from kernels.knn_args import bank_sq_norms

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
    "feature_chunks",
    "resize_input",
    "rotate_images",
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
# The largest turn ``bank_rotations`` takes: a pose jitter, not a new orientation of the layout.
MAX_BANK_ROTATION = 15.0


@dataclass(frozen=True)
class StructuralConfig:
    """Structural module settings; defaults follow the paper / PatchCore (gap notes §3).

    ``index``: the memory-bank search, ``auto`` | ``torch`` | ``faiss_gpu`` | a FAISS factory
    string (``Flat``, ``HNSW32``, ``IVF256,Flat``, ``IVF1024,PQ64``, ...); ``index_params``: FAISS
    parameters such as ``efSearch=64`` or ``nprobe=32`` (see :mod:`engine.models.knn_index`).
    An old name (``faiss_hnsw``, ...) is replaced by its factory string, said in the log.
    ``grid_level``: the level whose grid the patches lie on, None for the finest (PatchCore);
    finer levels are max-pooled onto it and left out of what the composition branch reads
    (:meth:`PatchFeatures.layout`; docs/ACCURACY.md, ablation 21).
    ``bank_flips``: flipped copies of the training images whose patches also enter the bank
    (:data:`BANK_FLIPS`), the coreset keeping ``coreset_ratio`` of them all.
    ``bank_rotations``: angles in degrees; each adds a copy of every training image turned by
    it about its centre (:func:`rotate_images`) to what the coreset chooses from, while the bank
    keeps the size it has without them: the copies show the parts in poses between those of the
    training images, not more rows to search (docs/ACCURACY.md, ablation 25).
    ``density_k``: 0 scores PatchCore's nearest-row distance; k > 0 weighs it by how crowded the
    bank is around that row (:mod:`engine.models.bank_density`, its k-th nearest other row);
    the ``cpu`` preset uses 3 (docs/ACCURACY.md, ablation 37), the paper preset PatchCore's 0.
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
    bank_rotations: tuple[float, ...] = ()
    density_k: int = 0

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
        turns = self.bank_rotations
        if not isinstance(turns, tuple) or not all(
            isinstance(a, int | float)
            and not isinstance(a, bool)
            and math.isfinite(a)
            and 0 < abs(a) <= MAX_BANK_ROTATION
            for a in turns
        ):
            raise ValueError(
                f"StructuralConfig.bank_rotations must be angles in degrees, each non-zero and "
                f"at most {MAX_BANK_ROTATION:g} either way, got {turns!r}"
            )
        if self.bank_dtype not in ("float32", "float16"):
            raise ValueError(
                f"StructuralConfig.bank_dtype must be float32 or float16, got {self.bank_dtype!r}"
            )
        if self.k != 1:
            raise ValueError("StructuralConfig.k: only k=1 (PatchCore's score) is implemented")
        d = self.density_k
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(
                f"StructuralConfig.density_k must be 0 (off) or a positive int, got {d!r}"
            )
        if not isinstance(self.compact_features, bool):
            raise ValueError(
                f"StructuralConfig.compact_features must be a bool, got {self.compact_features!r}"
            )


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
    rotation: float = 0.0,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch features of every image the loader yields: (N_images, h*w, D) float32 on CPU, and
    the (h, w) grid they lie on. ``flip``: image dims to flip first (see :data:`BANK_FLIPS`);
    ``size``: resize the images to this side first (:func:`resize_input`); ``rotation``: turn
    them by this many degrees first (:func:`rotate_images`)."""
    chunks, grid = feature_chunks(patch_features, loader, device, progress, flip, size, rotation)
    return torch.cat(chunks), grid


@torch.no_grad()
def feature_chunks(
    patch_features: PatchFeatures,
    loader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = True,
    flip: tuple[int, ...] = (),
    size: int | None = None,
    rotation: float = 0.0,
) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """:func:`extract_patch_features` as one (B, h*w, D) chunk per loader batch, not joined
    (joining would hold every feature twice for a moment)."""
    patch_features.to(device).eval()
    chunks, grid = [], (0, 0)
    for batch in tqdm(loader, desc="patch features", unit="batch", disable=not progress):
        images = loader_images(batch).to(device)
        if size is not None:
            images = resize_input(images, size)
        if rotation:
            images = rotate_images(images, rotation)
        features, grid = patch_features(images.flip(flip) if flip else images)
        chunks.append(features.float().cpu())
    if not chunks:
        raise ValueError("the training loader yielded no images")
    return chunks, grid


def coreset_bank(
    features: torch.Tensor | Sequence[torch.Tensor],
    cfg: StructuralConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
    basis: torch.Tensor | None = None,
    count: int | None = None,
) -> torch.Tensor:
    """(N, h*w, D) training patch features reduced to ``cfg.coreset_ratio`` of the patches (or
    to ``count`` rows) by greedy coreset: the (M, D) bank on CPU in ``cfg.bank_dtype``.
    ``features`` may be a sequence of (N_i, h*w, D) chunks, taken as their concatenation without
    building it. ``basis``: the :attr:`PatchFeatures.basis` of compact features (the picks are
    then the full features')."""
    chunks = [features] if isinstance(features, torch.Tensor) else list(features)
    flat = [chunk.reshape(-1, chunk.shape[-1]) for chunk in chunks]
    picks = greedy_coreset(
        flat,
        ratio=None if count else cfg.coreset_ratio,
        count=count,
        projection_dim=cfg.coreset_projection_dim,
        seed=cfg.coreset_seed,
        device=device,
        progress=progress,
        basis=basis,
    )
    return gather_rows(flat, picks.cpu()).to(getattr(torch, cfg.bank_dtype))


def build_memory_bank(
    patch_features: PatchFeatures,
    loader: Iterable,
    cfg: StructuralConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features of all training images, of their flipped copies (``cfg.bank_flips``) and of
    their turned copies (``cfg.bank_rotations``), reduced by :func:`coreset_bank` to
    ``cfg.coreset_ratio`` of the unturned ones' patches. ``features``: the loader's unflipped
    (N, h*w, D) patch features, when the caller has already extracted them."""
    # Chunks, never joined: at 350 LOCO-size images one copy's features are 1.5 GB.
    if features is None:
        chunks, _ = feature_chunks(patch_features, loader, device, progress)
    else:
        chunks = [features]
    for dims in BANK_FLIPS[cfg.bank_flips]:
        chunks += feature_chunks(patch_features, loader, device, progress, flip=dims)[0]
    count = coreset_size(sum(c.shape[0] * c.shape[1] for c in chunks), cfg.coreset_ratio, None)
    for angle in cfg.bank_rotations:
        chunks += feature_chunks(patch_features, loader, device, progress, rotation=angle)[0]
    return coreset_bank(chunks, cfg, device, progress, patch_features.basis, count)


def rotate_images(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """(B, C, H, W) images turned ``degrees`` about their centre (the sign picks the way): bilinear,
    the corners the turn uncovers filled by reflection (no black wedges that no frame shows)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    h, w = x.shape[-2:]
    # affine_grid works in [-1, 1] coordinates per axis: a non-square image needs its aspect
    theta = torch.tensor(
        [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class StructuralModel(nn.Module):
    """Patch features + memory bank; scores are Euclidean distances to the nearest bank entry,
    with ``density_k`` > 0 times that entry's ``row_scale`` (:func:`row_scales`).

    ``forward(x)`` on (B, 3, S, S) returns (B, h, w) patch scores; ``anomaly_map(x)`` returns
    (B, S, S), bilinearly upsampled (align_corners=False, PatchCore). Search is
    :func:`kernels.knn_min` against the registered ``bank`` buffer (export-safe; Triton on CUDA),
    unless :meth:`use_index` installed a FAISS index (see :func:`attach_index`).
    """

    def __init__(
        self,
        patch_features: PatchFeatures,
        bank: torch.Tensor | None = None,
        density_k: int = 0,
    ) -> None:
        super().__init__()
        self.patch_features = patch_features
        self.density_k = density_k
        self.register_buffer("bank", torch.empty(0, patch_features.out_dim))
        # (M,) with density_k, else empty: saved, so loading does not recompute it
        self.register_buffer("row_scale", torch.empty(0))
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
        return cls(features, density_k=cfg.density_k)

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
        if self.density_k and bank.shape[0] <= self.density_k:
            raise ValueError(
                f"structural.density_k={self.density_k} needs a bank of more than "
                f"{self.density_k} rows, got {bank.shape[0]}"
            )
        device = self.bank.device
        self.bank = bank.detach().to(device).contiguous()
        self.bank_sq = bank_sq_norms(self.bank)
        if self.density_k:
            self.row_scale = row_scales(self.bank, self.density_k)
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
        scale = state_dict.get(prefix + "row_scale")
        if scale is not None:
            self.row_scale = torch.empty_like(scale, device=self.row_scale.device)
        elif not self.density_k:  # saved before the field existed: plain PatchCore scores
            state_dict[prefix + "row_scale"] = self.row_scale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if bank is not None:
            expected = bank.shape[0] if self.density_k else 0
            if self.row_scale.numel() != expected:
                raise ValueError(
                    f"row_scale has {self.row_scale.numel()} entries; structural.density_k="
                    f"{self.density_k} with a bank of {bank.shape[0]} rows needs {expected}"
                )
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
            dist, idx = (found[:, 0] for found in self.index.search(flat.float(), 1))
        else:
            lowered = self.search_bank is not None
            bank = self.search_bank if lowered else self.bank
            bank_sq = self.search_bank_sq if lowered else self.bank_sq
            dist, idx = knn_min(flat.to(bank.dtype), bank, bank_sq=bank_sq)
        if self.row_scale.numel():
            dist = dist * self.row_scale[idx]
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
