"""The calibrated fusion as an ``nn.Module``: its state travels in the state dict.

What calibration finds (each branch's validation mean and std, and the decision threshold) and
the branch weights are buffers of :class:`Fusion`, so they move with ``.to(device)``, are saved
by ``state_dict`` and become constants of any graph traced through the module. The arithmetic
is :func:`engine.calibrate.fuse_maps` (its reference and kernels are tested there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.calibrate import BRANCHES, BranchStats, finite_threshold, fuse_maps

__all__ = ["Fusion"]


@dataclass(frozen=True)
class _HostValues:
    """The buffers as Python values: read once per change, so a frame never waits on the
    device to learn its own calibration."""

    stats: dict[str, BranchStats] | None
    weights: dict[str, float]
    threshold: float | None


class Fusion(nn.Module):
    """Standardise, weigh, merge and blur same-size branch maps (paper §III-C).

    Args:
        branches: the branch names fused, in :data:`engine.calibrate.BRANCHES` order.
        weights: each branch's weight in the merged map.
        sigma: the Gaussian's σ in pixels of the maps fused (see ``FusionConfig.sigma_at``).
        gate_power: with a composition branch, where its evidence goes (``fuse_maps``); None
            spreads it over every pixel.
        gate_after_blur: add the gated composition evidence after the blur.

    Buffers (float64, so they hold the manifest's numbers exactly): ``mean``, ``std``, ``weight``
    of shape (N,) in ``branches`` order and the scalar ``threshold`` (an image is anomalous when
    its score is above it). ``mean``, ``std``
    and ``threshold`` are NaN until :meth:`calibrate` / :meth:`set_threshold` or
    ``load_state_dict`` fill them. Change them through those, not in place: the Python copies
    the forward pass reads are refreshed there.

    ``forward(maps)``: branch name -> (B, S, S) map, every branch of ``branches`` present ->
    (B, S, S) float32 fused map.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    threshold: torch.Tensor

    def __init__(
        self,
        branches: Sequence[str],
        weights: Mapping[str, float],
        sigma: float,
        gate_power: float | None = None,
        gate_after_blur: bool = False,
    ) -> None:
        super().__init__()
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct names of {BRANCHES}, got {branches!r}")
        missing = [b for b in branches if b not in weights]
        if missing:
            raise ValueError(f"no fusion weight for branch(es) {missing}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.branches = tuple(branches)
        self.sigma = float(sigma)
        self.gate_power = gate_power
        self.gate_after_blur = gate_after_blur
        nan = torch.full((len(branches),), math.nan, dtype=torch.float64)
        self.register_buffer("mean", nan.clone())
        self.register_buffer("std", nan.clone())
        self.register_buffer(
            "weight", torch.tensor([float(weights[b]) for b in branches], dtype=torch.float64)
        )
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        self._host: _HostValues | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._forget())

    def calibrate(self, stats: Mapping[str, BranchStats]) -> None:
        """Store each branch's validation statistics."""
        missing = [b for b in self.branches if b not in stats]
        if missing:
            raise ValueError(f"no statistics for branch(es) {missing}")
        with torch.no_grad():
            self.mean.copy_(
                torch.tensor([stats[b].mean for b in self.branches], dtype=torch.float64)
            )
            self.std.copy_(torch.tensor([stats[b].std for b in self.branches], dtype=torch.float64))
        self._forget()

    def set_threshold(self, value: float) -> None:
        """Store the decision threshold; ValueError when it is not a finite number."""
        value = finite_threshold(value)
        with torch.no_grad():
            self.threshold.fill_(value)
        self._forget()

    @property
    def stats(self) -> dict[str, BranchStats] | None:
        """Each branch's statistics, or None before calibration."""
        return self._values().stats

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._values().weights)

    @property
    def threshold_value(self) -> float | None:
        """The decision threshold as a float, or None before it is set."""
        return self._values().threshold

    def forward(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        values = self._values()
        if values.stats is None:
            raise RuntimeError("the fusion is not calibrated: branch statistics are missing")
        return fuse_maps(
            maps, values.stats, values.weights, self.sigma, self.gate_power, self.gate_after_blur
        )

    def extra_repr(self) -> str:
        return (
            f"branches={self.branches}, sigma={self.sigma:g}, gate_power={self.gate_power}, "
            f"gate_after_blur={self.gate_after_blur}"
        )

    def _forget(self) -> None:
        self._host = None

    def _values(self) -> _HostValues:
        if self._host is None:
            means, stds, weights = (t.tolist() for t in (self.mean, self.std, self.weight))
            calibrated = all(math.isfinite(v) for v in means + stds)
            stats = (
                {b: BranchStats(m, s) for b, m, s in zip(self.branches, means, stds, strict=True)}
                if calibrated
                else None
            )
            threshold = float(self.threshold)
            self._host = _HostValues(
                stats,
                dict(zip(self.branches, weights, strict=True)),
                threshold if math.isfinite(threshold) else None,
            )
        return self._host
