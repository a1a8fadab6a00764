"""Parts per place (``CompositionConfig.windows``): how much of each component every window of
the image holds, against the good training images' windows at the same place.

The image descriptor counts parts over the whole image, so a part missing from one compartment
and one too many in the next cancel, and one missing part of fifteen moves a component's area by
a fifteenth. A window the size of a compartment sees the part appear or vanish outright. Per
window size (the grid divided by ``n``: a window of ``round(h / n) x round(w / n)`` patch cells,
moved by half its size), every window's K soft component areas are modelled by one Ledoit-Wolf
Gaussian per position over the training images, with a variance floor of one patch's share of
the window, squared (as the cell histograms). An image scores, per window size, the largest
``sqrt(d² / K)`` over its windows (about 1 on good windows).

The per-place model suits products with a fixed layout (compartments, labels, connectors) and
is noise where parts lie anywhere (screws in a bag): docs/ACCURACY.md, ablation 20.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.composition.ops import ledoit_wolf_batched

__all__ = ["WindowAreas", "window_shape"]


def window_shape(grid: tuple[int, int], division: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (height, width) in patch cells of the windows that divide ``grid`` by ``division``,
    and their stride (half the window, at least one cell)."""
    size = tuple(max(1, round(side / division)) for side in grid)
    return size, tuple(max(1, s // 2) for s in size)


class WindowAreas(nn.Module):
    """Soft component areas per window and place -> one distance per window size.

    Args:
        n_components: K.
        grid: (h, w), the patch grid of the component weights.
        divisions: per window size, the grid's sides divided by this (each >= 1).

    ``forward(weights)`` takes (B, K, h, w) soft component weights and returns (B, S) float32
    distances, S = ``len(divisions)``.
    """

    def __init__(self, n_components: int, grid: tuple[int, int], divisions: tuple[int, ...]):
        super().__init__()
        self.n_components = n_components
        self.grid = grid
        self.divisions = divisions
        self.shapes = [window_shape(grid, n) for n in divisions]
        for i, (size, stride) in enumerate(self.shapes):
            places = 1
            for side, s, t in zip(grid, size, stride):
                places *= (side - s) // t + 1
            k = n_components
            self.register_buffer(f"mean{i}", torch.zeros(places, k))
            self.register_buffer(f"precision{i}", torch.eye(k).repeat(places, 1, 1))
        # per window size: median and tail scale of the training images' leave-one-out distances
        self.register_buffer("loo_center", torch.zeros(len(divisions)))
        self.register_buffer("loo_scale", torch.ones(len(divisions)))

    def _areas(self, weights: torch.Tensor, i: int) -> torch.Tensor:
        """(B, K, h, w) -> (B, places, K) soft component areas of window size ``i``."""
        size, stride = self.shapes[i]
        pooled = F.avg_pool2d(weights, size, stride)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._distance(weights, i) for i in range(len(self.shapes))], 1)

    def _distance(self, weights: torch.Tensor, i: int) -> torch.Tensor:
        """(B, K, h, w) -> (B,) the largest window distance of window size ``i``."""
        areas = self._areas(weights.float(), i)
        return self._largest(areas, getattr(self, f"mean{i}"), getattr(self, f"precision{i}"))

    def _largest(
        self, areas: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor
    ) -> torch.Tensor:
        """(B, places, K) areas under per-place Gaussians -> (B,) ``sqrt(d² / K)`` of the
        farthest place."""
        d = areas.to(mean.dtype) - mean
        d2 = torch.einsum("bpk,pkl,bpl->bp", d, precision, d)
        return (d2.amax(1).clamp_min(0.0) / self.n_components).sqrt()

    @torch.no_grad()
    def rearranged(
        self, weights: torch.Tensor, copies: int, generator: torch.Generator
    ) -> torch.Tensor:
        """(B * copies, S) distances of rearranged good images: per window size, ``copies``
        versions of every (B, K, h, w) image with a region of half the window moved to another
        place of the same image. Where the layout is fixed, such a move is far from every
        training window at its place; where parts lie anywhere it is just another layout.
        Seeded by ``generator`` (CPU)."""
        b, _, h, w = weights.shape
        out = []
        for i, (size, _) in enumerate(self.shapes):
            rh, rw = max(1, size[0] // 2), max(1, size[1] // 2)
            moved = weights.float().repeat_interleave(copies, 0)
            corners = torch.stack(
                [
                    torch.randint(0, h - rh + 1, (b * copies, 2), generator=generator),
                    torch.randint(0, w - rw + 1, (b * copies, 2), generator=generator),
                ],
                -1,
            ).tolist()  # per copy: (source y, source x), (target y, target x)
            for j, ((sy, sx), (ty, tx)) in enumerate(corners):
                region = moved[j, :, sy : sy + rh, sx : sx + rw].clone()
                moved[j, :, ty : ty + rh, tx : tx + rw] = region
            out.append(self._distance(moved, i))
        return torch.stack(out, 1)

    @torch.no_grad()
    def fit(self, weights: torch.Tensor) -> None:
        """Fit every place's Gaussian on the (N, K, h, w) weights of the N >= 3 training images,
        and measure each window size's leave-one-out distances (:meth:`_fit_loo`)."""
        for i in range(len(self.shapes)):
            areas = self._areas(weights.float(), i)
            mean, precision = self._gaussians(areas, i)
            getattr(self, f"mean{i}").copy_(mean)
            getattr(self, f"precision{i}").copy_(precision)
            self._fit_loo(areas, i)

    def _gaussians(self, areas: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, places, K) areas -> per place mean (places, K) and floored precision (K, K)."""
        size = self.shapes[i][0]
        mean, covariance, _ = ledoit_wolf_batched(areas)
        floor = (1.0 / (size[0] * size[1])) ** 2
        eye = torch.eye(self.n_components, dtype=covariance.dtype, device=covariance.device)
        return mean, torch.linalg.inv(covariance + floor * eye)

    def _fit_loo(self, areas: torch.Tensor, i: int) -> None:
        """Window size ``i``: each training image's distance under the Gaussians of the others,
        from the (N, places, K) training areas; their median and (95th percentile - median) /
        1.645, a scale that matches the standard deviation of a normal tail and grows with a
        heavy one. Good images score like these, not like the images the Gaussians were fitted
        on."""
        values = torch.cat(
            [
                self._largest(
                    areas[j : j + 1], *self._gaussians(torch.cat([areas[:j], areas[j + 1 :]]), i)
                )
                for j in range(areas.shape[0])
            ]
        )
        center = values.quantile(0.5)
        scale = (values.quantile(0.95) - center) / 1.645
        self.loo_center[i] = center
        self.loo_scale[i] = torch.maximum(scale, 1e-3 * center.abs().clamp_min(1.0))
