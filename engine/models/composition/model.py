"""The composition model: components, image descriptors and their Mahalanobis scores."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.composition.absence import AbsenceMap
from engine.models.composition.config import (
    APPEARANCE_PARTS,
    MIN_TRAINING_IMAGES,
    CompositionConfig,
    positive_int,
)
from engine.models.composition.fine import FineParts
from engine.models.composition.ops import (
    blob_stats,
    descriptor_owners,
    median_mad,
    pca_basis,
    shrunk_precision,
)
from engine.models.composition.windows import WindowAreas
from engine.models.kmeans import kmeans
from kernels import vq_nearest

__all__ = ["CompositionModel"]


class CompositionModel(nn.Module):
    """Components of the patch features -> image descriptor -> Mahalanobis scores.

    Args:
        config: the settings.
        feature_dim: D, the patch feature size.
        grid: (h, w), the patch grid the features come on (fixed at construction).
        fine_channels: with ``config.fine_parts``, the channels of the two raw backbone levels
            :meth:`engine.models.structural.PatchFeatures.with_fine` returns.

    ``forward(features, grid, fine=None)`` takes (B, h*w, D) patch features in row-major grid
    order (:class:`engine.models.structural.PatchFeatures` output) and, with fine parts, those
    two raw levels; it returns ``(image_score (B,), cell_map (B, G, G), placement (B, h, w),
    weights (B, K, h, w))``, float32, larger = more anomalous, G = ``config.grid``; the first
    two are about 1 on typical good images, the placement is in [0, 1], 1 where the distance
    lies most (see the package docstring); ``weights`` are the main fit's soft component
    weights, what :attr:`absence` takes. With fine parts or windows the image score is the
    largest of the distances, each in validation MADs above its validation median (about 0 on
    good images); with several members (``config.members``) it is the mean of the members' such
    distances, standardised again the same way.
    Everything inference needs is a buffer (``state_dict`` carries it); ``forward`` has no
    data-dependent control flow.
    """

    def __init__(
        self,
        config: CompositionConfig,
        feature_dim: int,
        grid: tuple[int, int],
        fine_channels: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        positive_int("feature_dim", feature_dim)
        if len(grid) != 2:
            raise ValueError(f"grid must be (h, w), got {grid!r}")
        for side in grid:
            positive_int("grid side", side)
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
        # (F, K): each descriptor dimension's share per component (config only: not saved)
        self.register_buffer("owners", descriptor_owners(config), persistent=False)
        self._fitted = False  # mirrors the buffer as a Python bool: checked without a sync
        self.fine: FineParts | None = None
        self.windows: WindowAreas | None = None
        self._group_calibrated = False
        if config.fine_parts:
            if fine_channels is None:
                raise ValueError("CompositionConfig.fine_parts needs fine_channels")
            self.fine = FineParts(fine_channels, k, config.min_blob, config.variance_floor)
        if config.windows:
            self.windows = WindowAreas(k, self.grid, config.windows)
            # per window size: its rearranged-layout AUROC on validation; per group: whether it
            # takes part in the score (the descriptor's always does)
            self.register_buffer("window_auroc", torch.full((len(config.windows),), math.nan))
            self.register_buffer(
                "group_used", torch.ones(1 + len(config.windows), dtype=torch.bool)
            )
        self.absence: AbsenceMap | None = None
        if config.absence_sigma is not None:
            self.absence = AbsenceMap(k, self.grid, config.absence_sigma, config.absence_std_floor)
        # members 1..M-1: the same model fitted with other k-means seeds (this one is member 0)
        self.members = nn.ModuleList(
            CompositionModel(
                replace(config, members=1, seed=config.seed + i, absence_sigma=None),
                feature_dim,
                grid,
            )
            for i in range(1, config.members)
        )
        self.n_groups = config.members + len(config.windows) + int(config.fine_parts)
        if config.members > 1:  # the validation median and MAD of the members' mean
            self.register_buffer("ensemble_center", torch.full((), math.nan))
            self.register_buffer("ensemble_scale", torch.full((), math.nan))
        if config.groups_calibrated:
            # per group (descriptor, each window size, fine parts): median and MAD of the
            # validation distances
            self.register_buffer("group_center", torch.full((self.n_groups,), math.nan))
            self.register_buffer("group_scale", torch.full((self.n_groups,), math.nan))

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

    def parts(
        self,
        features: torch.Tensor,
        names: tuple[str, ...],
        assigned: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The descriptor parts ``names`` of (B, h*w, D) features, each (B, part size);
        ``assigned``: :meth:`assign`'s output for them, if the caller has it."""
        h, w = self.grid
        k = self.config.n_components
        z, indices, weights = self.assign(features) if assigned is None else assigned
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
        return self._describe(features)[:2]

    def _describe(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`describe`, and the soft component weights on the grid (B, K, h, w)."""
        names = self.config.part_names
        assigned = self.assign(features)
        parts = self.parts(features, tuple(dict.fromkeys((*names, "grid"))), assigned)
        descriptor = torch.cat([parts[name] for name in names], dim=1)
        g, k = self.config.grid, self.config.n_components
        weights = assigned[2].transpose(1, 2).reshape(-1, k, *self.grid)
        return descriptor, parts["grid"].reshape(-1, g * g, k), weights

    def forward(
        self,
        features: torch.Tensor,
        grid: tuple[int, int],
        fine: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, h*w, D) patch features [, raw fine levels] -> (image_score (B,), cell_map
        (B, G, G), placement (B, h, w), the main fit's soft component weights (B, K, h, w):
        what :attr:`absence` takes, returned so that the hot path assigns once)."""
        distances, cell_map, placement, weights = self._distances(features, grid, fine)
        placement = placement / placement.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        if self.n_groups == 1:
            return distances[:, 0], cell_map, placement, weights
        if not bool(self._group_calibrated):
            raise RuntimeError(
                "CompositionModel with several distances (several members, fine parts or "
                "windows) is not calibrated: call calibrate_groups() or load a state_dict"
            )
        z = (distances - self.group_center) / self.group_scale
        if len(self.members):
            score = (z.mean(1) - self.ensemble_center) / self.ensemble_scale
            return score, cell_map, placement, weights
        if self.windows is not None:
            used = self.group_used
            if self.fine is not None:
                used = torch.cat([used, used.new_ones(1)])
            z = z.masked_fill(~used, -math.inf)
        return z.amax(1), cell_map, placement, weights

    def component_weights(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D) patch features -> their soft component weights on the grid (B, K, h, w)
        (what :attr:`absence` takes)."""
        self._check(features, grid)
        if not self._fitted:
            raise RuntimeError("CompositionModel is not fitted: call fit() or load a state_dict")
        weights = self.assign(features)[2]
        return weights.transpose(1, 2).reshape(-1, self.config.n_components, *self.grid)

    def absence_peaks(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D) patch features -> (B,) the absence map's uncalibrated peaks, what
        :meth:`engine.models.composition.absence.AbsenceMap.calibrate` takes."""
        if self.absence is None:
            raise ValueError("absence_peaks is for a model with an absence map (absence_sigma)")
        return self.absence.peaks(self.component_weights(features, grid))

    def group_distances(
        self,
        features: torch.Tensor,
        grid: tuple[int, int],
        fine: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, groups) uncalibrated distances: the descriptor's (one per member), one per window
        size, then the fine parts' (those that are on)."""
        return self._distances(features, grid, fine)[0]

    @torch.no_grad()
    def rearranged_window_distances(
        self, features: torch.Tensor, grid: tuple[int, int], copies: int, generator: torch.Generator
    ) -> torch.Tensor:
        """(B * copies, S) window distances of the (B, h*w, D) images' soft component weights
        with a region moved (:meth:`engine.models.composition.windows.WindowAreas.rearranged`):
        what a window size would see of a layout broken on a good image."""
        if self.windows is None:
            raise ValueError("rearranged_window_distances is for a model with windows")
        self._check(features, grid)
        return self.windows.rearranged(self._describe(features)[2], copies, generator)

    @torch.no_grad()
    def calibrate_groups(
        self, distances: torch.Tensor, window_auroc: torch.Tensor | None = None
    ) -> None:
        """Standardise each group by the median and 1.4826 x MAD of its (N, groups)
        :meth:`group_distances` over the validation good images (floored: no zero scale), and
        with several members their mean the same way; with
        ``config.window_scale == "tail"`` the window sizes' by their training leave-one-out
        distances instead (:meth:`engine.models.composition.windows.WindowAreas.fit`).

        ``window_auroc`` (S,): per window size, how well its distance tells those images from
        their rearranged versions (:meth:`rearranged_window_distances`); a window size takes
        part in the score if that is at least ``config.window_check``. Needed exactly when the
        model has windows."""
        if self.n_groups == 1:
            raise ValueError(
                "calibrate_groups is for a model with fine parts, windows or several members"
            )
        groups = self.n_groups
        if distances.dim() != 2 or distances.shape[1] != groups or distances.shape[0] < 2:
            raise ValueError(f"expected (N >= 2, {groups}) distances, got {tuple(distances.shape)}")
        x = distances.double()
        center, scale = median_mad(x)
        if len(self.members):
            ensemble_center, ensemble_scale = median_mad(((x - center) / scale).mean(1))
            self.ensemble_center.copy_(ensemble_center)
            self.ensemble_scale.copy_(ensemble_scale)
        if self.windows is not None and self.config.window_scale == "tail":
            windows = slice(1, 1 + len(self.config.windows))
            center[windows] = self.windows.loo_center.double()
            scale[windows] = self.windows.loo_scale.double()
        self.group_center.copy_(center)
        self.group_scale.copy_(scale)
        if (window_auroc is None) != (self.windows is None):
            raise ValueError("window_auroc is needed exactly when the model has windows")
        if window_auroc is not None:
            if window_auroc.shape != self.window_auroc.shape:
                raise ValueError(
                    f"window_auroc must be ({self.window_auroc.numel()},), got "
                    f"{tuple(window_auroc.shape)}"
                )
            self.window_auroc.copy_(window_auroc)
            self.group_used[1:].copy_(self.window_auroc >= self.config.window_check)
        self._group_calibrated = True

    def _distances(
        self,
        features: torch.Tensor,
        grid: tuple[int, int],
        fine: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(distances (B, groups), cell_map, placement (B, h, w) summed over the members, soft
        component weights (B, K, h, w))."""
        self._check(features, grid)
        if not self._fitted:
            raise RuntimeError("CompositionModel is not fitted: call fit() or load a state_dict")
        if (fine is None) != (self.fine is None):
            raise ValueError(
                "fine-level features are needed exactly when the model has fine parts "
                f"(fine_parts={self.fine is not None}, got {'none' if fine is None else 'some'})"
            )
        descriptor, cells, weights = self._describe(features)
        u = (descriptor - self.descriptor_mean) / self.descriptor_scale
        # each dimension's part of the squared distance: u_i (P u)_i, summed over i it is d²
        shares = u * (u @ self.descriptor_precision)
        image = shares.sum(1).clamp_min(0.0).sqrt()
        c = cells - self.cell_mean
        cell = torch.einsum("bck,ckl,bcl->bc", c, self.cell_precision, c)
        g, k = self.config.grid, self.config.n_components
        cell_map = (cell.clamp_min(0.0) / k).sqrt().reshape(-1, g, g)
        placement = self._placement(shares, weights)
        groups = [image[:, None]]
        for member in self.members:
            distance, _, member_placement, _ = member._distances(features, grid, None)
            groups.append(distance)
            placement = placement + member_placement
        if self.windows is not None:
            groups.append(self.windows(weights))
        if self.fine is not None:
            groups.append(self.fine(*fine)[:, None])
        return torch.cat(groups, 1), cell_map, placement, weights

    def _placement(self, shares: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, h, w): where the descriptor's distance lies. Each component's positive part of the
        (B, F) ``shares`` of d² (a pair's split evenly between its two components), as a
        fraction of d², spread over the component's soft ``weights`` (B, K, h, w) divided by
        its area to the power ``config.placement_area_power`` (1: a density, so a miscounted
        small part outweighs a large one it shares an image with)."""
        total = shares.sum(1, keepdim=True).clamp_min(1e-12)
        per_component = (shares @ self.owners).clamp_min(0.0) / total
        area = weights.mean((-2, -1)).clamp_min(1e-3)
        per_component = per_component / area**self.config.placement_area_power
        return torch.einsum("bk,bkhw->bhw", per_component, weights)

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
        if features.shape[0] < MIN_TRAINING_IMAGES + bool(self.config.windows):
            raise ValueError(
                f"fit needs at least {MIN_TRAINING_IMAGES} training images (3 with windows: "
                f"each is scored under the others'), got {features.shape[0]}"
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
        patch_spread = self._fit_appearance(z, indices)
        descriptors, cells, weights = zip(
            *(
                self._describe(features[i : i + batch_size].to(device))
                for i in range(0, features.shape[0], batch_size)
            )
        )
        self._fit_descriptor(torch.cat(descriptors), patch_spread)
        self._fit_cells(torch.cat(cells))
        if self.windows is not None:
            self.windows.fit(torch.cat(weights))
        if self.absence is not None:
            self.absence.fit(torch.cat(weights))
        for member in self.members:
            member.fit(features, grid, batch_size)
        self.fitted.fill_(True)
        self._fitted = True
        return self

    def _sample_patches(self, features: torch.Tensor) -> torch.Tensor:
        """(min(fit_patches, N*h*w), D) float32 patches drawn without replacement (seeded)."""
        flat = features.reshape(-1, features.shape[-1])
        generator = torch.Generator().manual_seed(self.config.seed)
        picks = torch.randperm(flat.shape[0], generator=generator)[: self.config.fit_patches]
        return flat[picks.to(flat.device)].float()

    def _fit_appearance(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Per component: its patches' principal directions (global ones if it has too few).
        Returns (K, q) their patches' std along each direction (all patches' for a component
        with fewer than two)."""
        q = self.config.appearance_dim
        _, fallback = pca_basis(z, q)
        spread = torch.empty(self.config.n_components, q, device=z.device)
        for k in range(self.config.n_components):
            rows = z[indices == k]
            basis = pca_basis(rows, q)[1] if rows.shape[0] > q else fallback
            self.appearance_basis[k] = basis
            self.appearance_offset[k] = self.centroids[k] @ basis
            spread[k] = ((rows if rows.shape[0] > 1 else z) @ basis).std(0)
        return spread

    def _fit_descriptor(self, descriptors: torch.Tensor, patch_spread: torch.Tensor) -> None:
        """Per-dimension standardisation (floored per part; ``config.unseen_scale`` with the
        (K, q) ``patch_spread`` of :meth:`_fit_appearance`) and a block-diagonal precision: per
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
            floor = self.config.scale_floor * reference
            scale[part] = std[part].clamp_min(floor)
            if name in APPEARANCE_PARTS and self.config.unseen_scale > 0:
                unit = self.config.unseen_scale * patch_spread.flatten().to(scale)
                scale[part] = torch.where(std[part] < floor, scale[part].maximum(unit), scale[part])
            start += sizes[name]
        standardised = (descriptors - mean) / scale
        precision = torch.zeros_like(self.descriptor_precision)
        start = 0
        for group in self.config.groups:
            width = sum(sizes[name] for name in group)
            block = slice(start, start + width)
            precision[block, block] = (
                shrunk_precision(standardised[:, block], self.config.variance_floor) / width
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
            self.cell_precision[c] = shrunk_precision(cells[:, c], one_patch**2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted = bool(self.fitted)
        if self.n_groups > 1:
            self._group_calibrated = bool(torch.isfinite(self.group_scale).all())
            if len(self.members):
                self._group_calibrated &= bool(torch.isfinite(self.ensemble_scale))
