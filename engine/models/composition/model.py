"""The composition model: components, image descriptors and their Mahalanobis scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.composition.ops import blob_stats, ledoit_wolf, pca_basis
from engine.models.kmeans import kmeans
from kernels import vq_nearest

__all__ = ["MIN_TRAINING_IMAGES", "PARTS", "CompositionConfig", "CompositionModel"]

FUSED_MAPS = ("gated", "gated_after_blur", "image")
MIN_TRAINING_IMAGES = 2  # a covariance of the training descriptors needs two of them
# the descriptor parts a config may name (see the package docstring)
PARTS = ("area", "pairs", "blobs", "blob_size", "blob_spread", "grid", "appearance", "spread")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CompositionConfig.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class CompositionConfig:
    """Composition branch settings (see the package docstring for what each part measures).

    ``enabled``: whether a build fits the branch and fuses its map (the ``paper`` preset keeps
    the paper's two branches).
    ``fused_map``: what the branch contributes to fusion. Its evidence is about the whole
    image (counts, mixes, relations), so its map is the image score at every pixel; ``"gated"``
    places that score where the other branches see the anomaly
    (:func:`engine.calibrate.gated_composition`, with ``gate_power``) before the blur, which
    spreads the narrow gated peak and keeps only about half of the evidence in the image score,
    a share that varies from image to image; ``"gated_after_blur"`` adds it at the peak of the
    other branches' blurred map after the blur, so the image score rises by exactly the
    evidence (logical subset +0.018 / +0.007 and structural -0.009 / -0.006 on two seeds, mean
    unchanged, docs/ACCURACY.md: an option, not the default); ``"image"`` adds it to every pixel.
    docs/ACCURACY.md: a score on every pixel lifts the whole of an anomalous image and cuts
    AU-sPRO@0.05 by a third; gated, the fused map beats every single branch on both image
    AUROC and AU-sPRO. The per-cell map (``forward``'s second output) localises too coarsely to
    fuse.
    ``image_size``: the side of the images the branch's patch features come from; None: the
    memory bank's (``StructuralConfig.image_size``), so one backbone pass serves both. Another
    size costs a second pass of the same backbone, on the bank's input resized with antialias
    (:func:`engine.models.structural.resize_input`): a finer bank helps small defects, while
    the components and blobs are measured on the grid they were tuned on (docs/ACCURACY.md,
    ablations 11 and 12).
    ``n_components``: K, k-means components of the patch features.
    ``temperature``: soft assignment for every part but the blob ones: a patch's weight for
    component k is softmax_k(-d²_k / (temperature * m)), d_k its distance to centroid k and m
    the median squared distance of training patches to their nearest centroid; 0 = one-hot.
    ``pca_dim``: the features are projected on their top ``pca_dim`` principal directions
    (fitted on train patches) before k-means and assignment.
    ``appearance_dim``: q, per component the top directions of its own pixels' variation in
    that projection; ``appearance`` / ``spread`` / ``blob_spread`` are measured along them.
    ``grid``: G, the ``grid`` part and the cell map use G x G cells.
    ``parts``: the image score's covariance groups: each entry is one or more part names of
    ``PARTS`` joined by ``+``, modelled by one joint Ledoit-Wolf covariance; groups are
    independent and each adds its squared distance divided by its size.
    ``min_blob``: blobs smaller than this many grid cells are neither counted nor compared.
    ``label_iterations``: connected-component steps (12 labels any mask up to 64 x 64 exactly).
    ``variance_floor``: added to the diagonal of every standardised descriptor covariance, so
    no direction has less variance than this (unit = a typical dimension's variance). With few
    training images some directions never vary; without a floor their precision is huge and one
    small change scores millions (a 1e-6 floor on 8 images gave fused maps of 8e6).
    ``scale_floor``: a descriptor dimension's scale is at least this fraction of its part's
    median scale, so dimensions constant on the training set stay finite.
    ``fit_patches``: patches sampled (seeded) from the training images for the PCA and k-means.
    ``kmeans_iterations`` / ``kmeans_restarts`` / ``seed``: k-means settings.
    """

    enabled: bool = False
    fused_map: str = "gated"
    gate_power: float = 8.0
    image_size: int | None = None
    n_components: int = 8
    temperature: float = 0.3
    pca_dim: int = 32
    appearance_dim: int = 2
    grid: int = 4
    parts: tuple[str, ...] = ("area+pairs+appearance+spread+blob_spread",)
    min_blob: int = 2
    label_iterations: int = 12
    scale_floor: float = 0.1
    variance_floor: float = 0.1
    fit_patches: int = 50_000
    kmeans_iterations: int = 50
    kmeans_restarts: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "n_components",
            "pca_dim",
            "appearance_dim",
            "grid",
            "min_blob",
            "label_iterations",
            "fit_patches",
            "kmeans_iterations",
            "kmeans_restarts",
        ):
            _positive_int(name, getattr(self, name))
        if self.image_size is not None:
            _positive_int("image_size", self.image_size)
        if self.n_components < 2:
            raise ValueError(
                f"CompositionConfig.n_components must be >= 2, got {self.n_components}"
            )
        if self.appearance_dim > self.pca_dim:
            raise ValueError(
                f"CompositionConfig.appearance_dim ({self.appearance_dim}) must not exceed "
                f"pca_dim ({self.pca_dim})"
            )
        self._check_parts()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(
                f"CompositionConfig.seed must be a non-negative int, got {self.seed!r}"
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not 0 <= self.temperature < 1e3
        ):
            raise ValueError(
                f"CompositionConfig.temperature must be in [0, 1000), got {self.temperature!r}"
            )
        if self.fused_map not in FUSED_MAPS:
            raise ValueError(
                f"CompositionConfig.fused_map must be one of {FUSED_MAPS}, got {self.fused_map!r}"
            )
        if isinstance(self.gate_power, bool) or not (
            isinstance(self.gate_power, int | float) and 0 < self.gate_power <= 64
        ):
            raise ValueError(
                f"CompositionConfig.gate_power must be in (0, 64], got {self.gate_power!r}"
            )
        if isinstance(self.variance_floor, bool) or not (
            isinstance(self.variance_floor, int | float) and 0 < self.variance_floor <= 10
        ):
            raise ValueError(
                f"CompositionConfig.variance_floor must be in (0, 10], got {self.variance_floor!r}"
            )
        if (
            isinstance(self.scale_floor, bool)
            or not isinstance(self.scale_floor, int | float)
            or not 0 < self.scale_floor <= 1
        ):
            raise ValueError(
                f"CompositionConfig.scale_floor must be in (0, 1], got {self.scale_floor!r}"
            )

    def _check_parts(self) -> None:
        if (
            not isinstance(self.parts, tuple)
            or not self.parts
            or not all(isinstance(g, str) for g in self.parts)
        ):
            raise ValueError(
                f"CompositionConfig.parts must be a non-empty tuple of strings, got {self.parts!r}"
            )
        names = self.part_names
        if any(name not in PARTS for name in names) or len(set(names)) != len(names):
            raise ValueError(
                f"CompositionConfig.parts: each entry joins part names with '+', every name "
                f"once, from {PARTS}; got {self.parts!r}"
            )

    def own_pass_size(self, bank_size: int) -> int | None:
        """The input side of the branch's own backbone pass: ``image_size`` when it differs
        from the memory bank's ``bank_size``, else None (the bank's features serve both)."""
        return None if self.image_size in (None, bank_size) else self.image_size

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """``parts`` split into its covariance groups of part names."""
        return tuple(tuple(group.split("+")) for group in self.parts)

    @property
    def part_names(self) -> tuple[str, ...]:
        """The part names of ``parts`` in descriptor order."""
        return tuple(name for group in self.groups for name in group)

    def part_sizes(self) -> dict[str, int]:
        """Descriptor length of every part in ``PARTS``."""
        k, q = self.n_components, self.appearance_dim
        return {
            "area": k,
            "pairs": k * (k - 1) // 2,
            "blobs": k,
            "blob_size": 2 * k,
            "blob_spread": k * q,
            "grid": k * self.grid**2,
            "appearance": k * q,
            "spread": k * q,
        }


class CompositionModel(nn.Module):
    """Components of the patch features -> image descriptor -> Mahalanobis scores.

    Args:
        config: the settings.
        feature_dim: D, the patch feature size.
        grid: (h, w), the patch grid the features come on (fixed at construction).

    ``forward(features, grid)`` takes (B, h*w, D) patch features in row-major grid order
    (:class:`engine.models.structural.PatchFeatures` output) and returns
    ``(image_score (B,), cell_map (B, G, G))``, float32, larger = more anomalous, G =
    ``config.grid``; both are about 1 on typical good images (see the package docstring).
    Everything inference needs is a buffer (``state_dict`` carries it); ``forward`` has no
    data-dependent control flow.
    """

    def __init__(self, config: CompositionConfig, feature_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        _positive_int("feature_dim", feature_dim)
        if len(grid) != 2:
            raise ValueError(f"grid must be (h, w), got {grid!r}")
        for side in grid:
            _positive_int("grid side", side)
        self.config = config
        self.feature_dim = feature_dim
        self.grid = (int(grid[0]), int(grid[1]))
        k, p, q, cells = config.n_components, config.pca_dim, config.appearance_dim, config.grid**2
        width = sum(config.part_sizes()[name] for name in config.part_names)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("projection", torch.zeros(feature_dim, p))
        self.register_buffer("centroids", torch.zeros(k, p))
        self.register_buffer("assign_scale", torch.ones(()))
        self.register_buffer("appearance_basis", torch.zeros(k, p, q))
        self.register_buffer("appearance_offset", torch.zeros(k, q))
        self.register_buffer("descriptor_mean", torch.zeros(width))
        self.register_buffer("descriptor_scale", torch.ones(width))
        self.register_buffer("descriptor_precision", torch.eye(width))
        self.register_buffer("cell_mean", torch.zeros(cells, k))
        self.register_buffer("cell_precision", torch.eye(k).repeat(cells, 1, 1))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._fitted = False  # mirrors the buffer as a Python bool: checked without a sync

    def _check(self, features: torch.Tensor, grid: tuple[int, int]) -> None:
        h, w = self.grid
        if tuple(grid) != self.grid:
            raise ValueError(f"the model was built for a {h}x{w} patch grid, got {tuple(grid)}")
        if features.dim() != 3 or features.shape[1:] != (h * w, self.feature_dim):
            raise ValueError(
                f"expected (B, {h * w}, {self.feature_dim}) patch features, "
                f"got {tuple(features.shape)}"
            )

    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) features -> projected features (B, N, p), nearest component (B, N) and
        component weights (B, N, K): softmax(-d² / (temperature * assign_scale)), or one-hot."""
        z = (features.float() - self.feature_mean) @ self.projection
        c = self.centroids
        d2 = (z * z).sum(-1, keepdim=True) - 2.0 * z @ c.t() + (c * c).sum(-1)
        indices = d2.argmin(-1)  # the same as kernels.vq_nearest, with d² kept for the weights
        if self.config.temperature > 0:
            weights = torch.softmax(-d2 / (self.config.temperature * self.assign_scale), dim=-1)
        else:
            weights = F.one_hot(indices, self.config.n_components).float()
        return z, indices, weights

    def parts(self, features: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The descriptor parts ``names`` of (B, h*w, D) features, each (B, part size)."""
        h, w = self.grid
        k = self.config.n_components
        z, indices, weights = self.assign(features)
        b, n = indices.shape
        wanted = set(names)
        area = weights.mean(1)
        out = {"area": area}
        if "pairs" in wanted:  # co-presence: large only where both components are present
            first, second = torch.triu_indices(k, k, offset=1, device=area.device).unbind(0)
            out["pairs"] = (area[:, first] * area[:, second]).sqrt()
        if "grid" in wanted:
            out["grid"] = self._cell_histograms(weights).flatten(1)
        if wanted & {"appearance", "spread", "blob_spread"}:
            # (B, N, K, q): every patch's coordinates in every component's appearance basis
            coords = torch.einsum("bnp,kpq->bnkq", z, self.appearance_basis)
            coords = coords - self.appearance_offset
            mass = weights.sum(1).clamp_min(1.0)[..., None]  # (B, K, 1)
            mean = torch.einsum("bnk,bnkq->bkq", weights, coords) / mass
            square = torch.einsum("bnk,bnkq->bkq", weights, coords * coords) / mass
            out["appearance"] = mean.flatten(1)
            out["spread"] = (square - mean * mean).clamp_min(0.0).sqrt().flatten(1)
        if wanted & {"blobs", "blob_size", "blob_spread"}:
            masks = F.one_hot(indices, k).transpose(1, 2).reshape(b * k, h, w) > 0
            if "blob_spread" in wanted:
                values = coords.permute(0, 2, 1, 3).reshape(b * k, n, -1)
            else:
                values = z.new_zeros(b * k, n, 1)
            count, size, spread = blob_stats(
                masks, values, self.config.label_iterations, self.config.min_blob
            )
            out["blobs"] = count.reshape(b, k)
            out["blob_size"] = size.reshape(b, 2 * k) / n
            out["blob_spread"] = spread.reshape(b, -1)
        return {name: out[name] for name in names}

    def _cell_histograms(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, N, K) component weights -> (B, G*G, K) component shares per grid cell."""
        h, w = self.grid
        b, _, k = weights.shape
        maps = weights.transpose(1, 2).reshape(b, k, h, w)
        cells = F.adaptive_avg_pool2d(maps, self.config.grid)  # (B, K, G, G)
        return cells.flatten(2).transpose(1, 2)

    def describe(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h*w, D) -> (descriptor (B, F) of ``config.parts``, cell histograms (B, G*G, K))."""
        names = self.config.part_names
        parts = self.parts(features, tuple(dict.fromkeys((*names, "grid"))))
        descriptor = torch.cat([parts[name] for name in names], dim=1)
        g, k = self.config.grid, self.config.n_components
        return descriptor, parts["grid"].reshape(-1, k, g * g).transpose(1, 2)

    def forward(
        self, features: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h*w, D) patch features -> (image_score (B,), cell_map (B, G, G))."""
        self._check(features, grid)
        if not self._fitted:
            raise RuntimeError("CompositionModel is not fitted: call fit() or load a state_dict")
        descriptor, cells = self.describe(features)
        u = (descriptor - self.descriptor_mean) / self.descriptor_scale
        image = torch.einsum("bi,ij,bj->b", u, self.descriptor_precision, u)
        c = cells - self.cell_mean
        cell = torch.einsum("bck,ckl,bcl->bc", c, self.cell_precision, c)
        g, k = self.config.grid, self.config.n_components
        return image.clamp_min(0.0).sqrt(), (cell.clamp_min(0.0) / k).sqrt().reshape(-1, g, g)

    @torch.no_grad()
    def fit(
        self, features: torch.Tensor, grid: tuple[int, int], batch_size: int = 16
    ) -> CompositionModel:
        """Fit every buffer on the (N, h*w, D) patch features of the N training images.

        Steps: PCA and k-means on ``config.fit_patches`` sampled patches; per component, the
        principal directions of its patches (appearance basis); the descriptors of all N images,
        standardised per dimension and modelled per group by a Ledoit-Wolf covariance; the same
        (unstandardised) for the K-dim histogram of every grid cell. ``features`` may be float16
        and on any device; the work runs on this module's device. Needs N >= 2. Returns ``self``.
        """
        self._check(features[:1], grid)
        if features.shape[0] < MIN_TRAINING_IMAGES:
            raise ValueError(
                f"fit needs at least {MIN_TRAINING_IMAGES} training images, got {features.shape[0]}"
            )
        if not torch.isfinite(features).all():
            raise ValueError("the training features contain NaN or infinite values")
        cfg = self.config
        device = self.feature_mean.device
        sample = self._sample_patches(features).to(device)
        mean, basis = pca_basis(sample, cfg.pca_dim)
        self.feature_mean.copy_(mean)
        self.projection.copy_(basis)
        z = (sample - mean) @ basis
        self.centroids.copy_(
            kmeans(z, cfg.n_components, cfg.kmeans_iterations, cfg.kmeans_restarts, cfg.seed)
        )
        indices, nearest = vq_nearest(z, self.centroids)
        self.assign_scale.fill_(float(((z - nearest) ** 2).sum(1).median().clamp_min(1e-12)))
        self._fit_appearance(z, indices)
        descriptors, cells = zip(
            *(
                self.describe(features[i : i + batch_size].to(device))
                for i in range(0, features.shape[0], batch_size)
            )
        )
        self._fit_descriptor(torch.cat(descriptors))
        self._fit_cells(torch.cat(cells))
        self.fitted.fill_(True)
        self._fitted = True
        return self

    def _sample_patches(self, features: torch.Tensor) -> torch.Tensor:
        """(min(fit_patches, N*h*w), D) float32 patches drawn without replacement (seeded)."""
        flat = features.reshape(-1, features.shape[-1])
        generator = torch.Generator().manual_seed(self.config.seed)
        picks = torch.randperm(flat.shape[0], generator=generator)[: self.config.fit_patches]
        return flat[picks.to(flat.device)].float()

    def _fit_appearance(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """Per component: its patches' principal directions (global ones if it has too few)."""
        q = self.config.appearance_dim
        _, fallback = pca_basis(z, q)
        for k in range(self.config.n_components):
            rows = z[indices == k]
            basis = pca_basis(rows, q)[1] if rows.shape[0] > q else fallback
            self.appearance_basis[k] = basis
            self.appearance_offset[k] = self.centroids[k] @ basis

    def _fit_descriptor(self, descriptors: torch.Tensor) -> None:
        """Per-dimension standardisation (floored per part) and a block-diagonal precision: per
        group, the Ledoit-Wolf precision divided by the group's size, so that every group adds
        about 1 to the squared score of a typical good image, whatever its size."""
        mean, std = descriptors.mean(0), descriptors.std(0)
        sizes = self.config.part_sizes()
        scale = torch.empty_like(std)
        varying = std[std > 1e-6]
        # A part constant on every training image (few images) borrows the typical scale of
        # the others, else 1: a floor of ~0 would turn the smallest change into a huge score.
        typical = float(varying.median()) if varying.numel() else 1.0
        start = 0
        for name in self.config.part_names:
            part = slice(start, start + sizes[name])
            part_median = float(std[part].median())
            reference = part_median if part_median > 1e-6 else typical
            scale[part] = std[part].clamp_min(self.config.scale_floor * reference)
            start += sizes[name]
        standardised = (descriptors - mean) / scale
        precision = torch.zeros_like(self.descriptor_precision)
        start = 0
        for group in self.config.groups:
            width = sum(sizes[name] for name in group)
            block = slice(start, start + width)
            precision[block, block] = (
                _shrunk_precision(standardised[:, block], self.config.variance_floor) / width
            )
            start += width
        self.descriptor_mean.copy_(mean)
        self.descriptor_scale.copy_(scale)
        self.descriptor_precision.copy_(precision)

    def _fit_cells(self, cells: torch.Tensor) -> None:
        """Mean and Ledoit-Wolf precision of every cell's (K,) histogram over the images.

        The variance floor is one patch's share of a cell, squared: a cell that never changed on
        the training set scores about 1 per patch that changes component, not without bound."""
        h, w = self.grid
        one_patch = self.config.grid**2 / (h * w)
        for c in range(cells.shape[1]):
            self.cell_mean[c] = cells[:, c].mean(0)
            self.cell_precision[c] = _shrunk_precision(cells[:, c], one_patch**2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted = bool(self.fitted)


def _shrunk_precision(samples: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Inverse of the Ledoit-Wolf covariance of (n, d) samples plus ``ridge`` on the diagonal,
    so dimensions constant on the training set stay invertible and bounded."""
    _, covariance, _ = ledoit_wolf(samples)
    covariance = covariance.double()
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    return torch.linalg.inv(covariance + ridge * eye).float()
