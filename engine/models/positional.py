"""Positional memory (beyond the paper): each patch compared with the training patches found
near the *same place* of the good training images.

The memory bank (:mod:`engine.models.structural`) asks whether a patch looks like any good patch
anywhere, so a part that is present but in the wrong place, and a place that should hold a part
but is empty, pass it (docs/ACCURACY.md: breakfast_box ``missing_toppings`` is at 0.02 in the
bank alone). This branch keeps every training image's patch features on their grid and scores a
patch by its distance to the nearest training patch within ``radius`` cells of its own position,
over all training images: the good images' own variation in pose and layout is the tolerance,
so a random layout (screws anywhere in a bag) costs little while a fixed one (a compartment that
always holds almonds) is enforced. SPADE and position-conditioned PatchCore variants score this
way; here it is a separate map, fused by the maximum like the other map branches.

Input: the memory bank's patch features ``(B, h*w, D)`` on their grid (no backbone pass of its
own), projected on the top ``dims`` principal directions of the training patches and averaged
over ``pool`` x ``pool`` cells. Every fitted value is a buffer: ``mean`` (D,), ``basis``
(D, d) and ``memory`` (M, h' + 2r, w' + 2r, d), the training images' pooled projections
zero-padded by ``r`` cells (the padding is never searched; it stays for the artifacts' format).
With more than ``max_images`` training images, each cell keeps the M = ``max_images`` of its N
training vectors that a greedy k-center selection picks (PatchCore's coreset rule, per cell):
every dropped vector lies within the selection's coverage radius ε of a kept one at the same
cell, so no score rises by more than ε (triangle inequality), while the memory and the search
stay the size of M images however many training images there are. ``memory_sq``, the memory's
squared norms, is derived from ``memory`` (not saved).

The search runs memory cell by memory cell: each training cell's M vectors meet, in one small
matrix product, the (2r + 1)² query cells whose windows hold it (B of each in a batch), and each
query then takes the smallest of its (2r + 1)² per-cell minima. That computes exactly the
distances needed and reads the memory once per call, in a cell-major layout (the ``memory``
buffer keeps its (M, h' + 2r, w' + 2r, d) shape, its storage ordered cell by cell). The
previous search, one GEMM per 8 x 8-cell tile against the tile's widened block with the
out-of-window candidates masked, computed ``(8 + 2r)² / (2r + 1)²`` times the distances needed
(benchmarks/test_positional_search.py times both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.composition.ops import pca_basis

__all__ = ["PositionalConfig", "PositionalModel"]


@dataclass(frozen=True)
class PositionalConfig:
    """Positional memory settings (see the module docstring).

    ``enabled``: whether a build fits the branch and fuses its map.
    ``pool``: the features are averaged over ``pool`` x ``pool`` cells of the memory bank's
    grid first (a 48 x 48 grid becomes 24 x 24 at 2): fewer, broader cells tolerate pose better
    and cost ``pool**4`` times less search.
    ``radius``: r, the patches searched lie within r cells (of the pooled grid) of the query's
    own cell, in both directions, on every training image; 0 compares each cell with the same
    cell only.
    ``dims``: d, the principal directions of the training patches kept (at most the features'
    dimension): the memory holds d values per training cell.
    ``fit_patches``: patches sampled (seeded with ``seed``) from the training images for the
    principal directions.
    ``max_images``: M, at most this many training vectors kept per cell (k-center selection,
    see the module docstring); ``None`` keeps every training image's.
    """

    enabled: bool = False
    pool: int = 2
    radius: int = 1
    dims: int = 128
    fit_patches: int = 20000
    seed: int = 0
    max_images: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"PositionalConfig.enabled must be a bool, got {self.enabled!r}")
        for name, low in (
            ("pool", 1),
            ("radius", 0),
            ("dims", 1),
            ("fit_patches", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"PositionalConfig.{name} must be an int >= {low}, got {value!r}")
        cap = self.max_images
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(
                f"PositionalConfig.max_images must be an int >= 1 or null, got {cap!r}"
            )

    def memory_rows(self, n_images: int) -> int:
        """M, the memory's rows (training vectors per cell) for ``n_images`` training images."""
        return n_images if self.max_images is None else min(n_images, self.max_images)

    def pooled_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid the memory lies on, for features on ``grid`` (partial cells kept)."""
        return (-(-int(grid[0]) // self.pool), -(-int(grid[1]) // self.pool))


class PositionalModel(nn.Module):
    """The positional memory of ``rows`` training vectors per cell, on the features' ``grid``.

    Args:
        config: the branch settings.
        feature_dim: D, the patch features' dimension.
        grid: (h, w), the patch grid of the features it is fitted on and scores.
        rows: M, the training vectors it holds per cell (``config.memory_rows`` of the training
            image count).

    The buffers have their fitted shapes from the start (NaN until :meth:`fit`), so an artifact
    loads them with ``load_state_dict``. ``forward(features (B, h*w, D), grid) -> (B, h', w')``:
    each pooled cell's distance to the nearest training cell within ``radius`` cells.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    memory: torch.Tensor
    memory_sq: torch.Tensor

    def __init__(
        self, config: PositionalConfig, feature_dim: int, grid: tuple[int, int], rows: int
    ) -> None:
        super().__init__()
        if rows < 1:
            raise ValueError("the positional memory needs at least one training image")
        self.config = config
        self.grid = (int(grid[0]), int(grid[1]))
        self.dims = min(config.dims, feature_dim)
        r = config.radius
        h, w = config.pooled_grid(self.grid)
        nan = math.nan
        self.register_buffer("mean", torch.full((feature_dim,), nan))
        self.register_buffer("basis", torch.full((feature_dim, self.dims), nan))
        cell_major = torch.full((h + 2 * r, w + 2 * r, rows, self.dims), nan)
        self.register_buffer("memory", cell_major.permute(2, 0, 1, 3))
        self.register_buffer("memory_sq", self._squares(), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_squares())

    @torch.no_grad()
    def fit(self, features: torch.Tensor, grid: tuple[int, int]) -> PositionalModel:
        """Fit on the training images' patch features (N, h*w, D) on ``grid``, N >= M."""
        n, _, dim = self._check(features, grid)
        rows = self.memory.shape[0]
        if n < rows or (n > rows and self.config.memory_rows(n) != rows):
            raise ValueError(
                f"a memory of {rows} rows expects {rows} training images"
                + ("" if self.config.max_images is None else " or more")
                + f", got {n}"
            )
        flat = features.reshape(-1, dim)
        generator = torch.Generator().manual_seed(self.config.seed)
        picks = torch.randperm(len(flat), generator=generator)[: self.config.fit_patches]
        mean, basis = pca_basis(flat[picks.to(flat.device)], self.dims)
        cells = self._cells(features.float(), mean, basis)  # (N, h', w', d)
        if n > rows:
            cells = kcenter_per_cell(cells, rows)
        r = self.config.radius
        self.mean.copy_(mean)
        self.basis.copy_(basis)
        self.memory.copy_(F.pad(cells, (0, 0, r, r, r, r)))
        self._refresh_squares()
        return self

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self._check(features, grid)
        x = self._cells(features.float(), self.mean, self.basis)  # (B, h', w', d)
        batch, h, w, dims = x.shape
        r = self.config.radius
        offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        padded = F.pad(x, (0, 0, r, r, r, r))
        # At memory cell (u, v), the query that looks at it from offset (dy, dx) is (u-dy, v-dx).
        queries = torch.stack(
            [padded[:, r - dy : r - dy + h, r - dx : r - dx + w] for dy, dx in offsets], dim=3
        )  # (B, h', w', K, d), K = (2r + 1)²
        queries = queries.permute(1, 2, 3, 0, 4).reshape(h, w, len(offsets) * batch, dims)
        memory = self.memory.permute(1, 2, 0, 3)  # (h' + 2r, w' + 2r, M, d), contiguous
        best = x.new_empty(h, w, len(offsets) * batch)
        for u in range(h):  # one memory row of cells per product: (w', K*B, d) x (w', d, M)
            candidates = memory[u + r, r : r + w]
            squares = self.memory_sq[u, :, None]
            products = torch.baddbmm(squares, queries[u], candidates.transpose(1, 2), alpha=-2)
            best[u] = products.amin(-1)
        # Query (i, j) takes offset (dy, dx)'s minimum from memory cell (i+dy, j+dx); +inf off
        # the grid.
        best = F.pad(
            best.reshape(h, w, len(offsets), batch), (0, 0, 0, 0, r, r, r, r), value=math.inf
        )
        nearest = torch.stack(
            [
                best[r + dy : r + dy + h, r + dx : r + dx + w, k]
                for k, (dy, dx) in enumerate(offsets)
            ]
        ).amin(0)  # (h', w', B)
        return (nearest.permute(2, 0, 1) + x.pow(2).sum(-1)).clamp_min(0).sqrt()

    def _squares(self) -> torch.Tensor:
        """(h', w', M): the squared norms of the memory's vectors, cell by cell."""
        r = self.config.radius
        inside = self.memory.permute(1, 2, 0, 3)[
            r : self.memory.shape[1] - r, r : self.memory.shape[2] - r
        ]
        return inside.pow(2).sum(-1)

    def _refresh_squares(self) -> None:
        # A state dict loaded with ``assign=True`` brings its own layout: put it back cell-major.
        cell_major = self.memory.permute(1, 2, 0, 3)
        if not cell_major.is_contiguous():
            self.memory = cell_major.contiguous().permute(2, 0, 1, 3)
        self.memory_sq = self._squares()

    def _cells(
        self, features: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor
    ) -> torch.Tensor:
        """(B, h*w, D) -> (B, h', w', d): projected, then pooled over ``pool`` x ``pool`` cells."""
        projected = ((features - mean) @ basis).reshape(len(features), *self.grid, -1)
        pool = self.config.pool
        if pool == 1:
            return projected
        pooled = F.avg_pool2d(projected.permute(0, 3, 1, 2), pool, ceil_mode=True)
        return pooled.permute(0, 2, 3, 1).contiguous()

    def _check(self, features: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int, int]:
        if features.dim() != 3:
            raise ValueError(f"expected (B, h*w, D) features, got shape {tuple(features.shape)}")
        if tuple(grid) != self.grid or features.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"the positional memory was fitted on a {self.grid} grid, got features of "
                f"{features.shape[1]} patches on {tuple(grid)}"
            )
        if features.shape[-1] != self.mean.shape[0]:
            raise ValueError(
                f"expected {self.mean.shape[0]}-d features, got {features.shape[-1]}-d"
            )
        return int(features.shape[0]), int(features.shape[1]), int(features.shape[2])


def kcenter_per_cell(cells: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, h, w, d) -> (rows, h, w, d): at each cell, a greedy k-center selection of ``rows`` of
    its N vectors, starting from the one nearest the cell's mean (deterministic)."""
    n, h, w, d = cells.shape
    points = cells.permute(1, 2, 0, 3).reshape(h * w, n, d)
    first = (points - points.mean(1, keepdim=True)).pow(2).sum(-1).argmin(1)
    picks = [first]
    nearest = torch.full((h * w, n), math.inf, device=cells.device)
    for _ in range(rows - 1):
        chosen = points[torch.arange(h * w, device=cells.device), picks[-1]]
        nearest = torch.minimum(nearest, (points - chosen[:, None]).pow(2).sum(-1))
        picks.append(nearest.argmax(1))
    index = torch.stack(picks, 1)  # (h*w, rows)
    kept = points.gather(1, index[..., None].expand(-1, -1, d))
    return kept.reshape(h, w, rows, d).permute(2, 0, 1, 3).contiguous()
