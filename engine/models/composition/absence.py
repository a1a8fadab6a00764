"""Where a part is missing (``CompositionConfig.absence_sigma``): each component's blurred
occupancy of the patch grid against the training images' at the same place.

The image descriptor says *that* a part is missing, and the placement map marks the parts of
that kind that remain; a missing part leaves no pixel of its own to mark. Where the training
images always hold some of a component (a compartment's pin, a label), the component's soft
weight, blurred over about a part's size, falls far below its training mean when the part is
gone. The deficit is, per patch, the largest such fall over the components in training standard
deviations (floored, so a place that never changed does not turn noise into evidence), 0 where
nothing is missing. The map is the deficit in units of its validation image scores (0 at the
typical good image's peak), as the fusion's other inputs; the fusion marks only what lies above
0 (``FusionConfig.absence_weight``), so where parts lie anywhere and the deficit is noise, good
images gain little.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels import gaussian_blur

__all__ = ["AbsenceMap"]


class AbsenceMap(nn.Module):
    """Soft component weights -> per-patch deficit against the training images' occupancy.

    Args:
        n_components: K.
        grid: (h, w), the patch grid of the component weights.
        sigma: the blur's σ as a share of the grid's longer side (about a part's size).
        std_floor: the smallest training std of a blurred occupancy (a share of a patch).

    ``forward(weights)`` takes (B, K, h, w) soft component weights and returns the (B, h, w)
    float32 map ``(deficit - peak_mean) / peak_std``, with ``deficit =
    max_k max(0, (mean_k - blur(weights_k)) / std_k)`` (:meth:`deficit`) and ``peak_*`` the
    mean and std of its maximum over the validation good images (:meth:`calibrate`).
    """

    mean: torch.Tensor
    std: torch.Tensor
    peak_mean: torch.Tensor
    peak_std: torch.Tensor

    def __init__(
        self, n_components: int, grid: tuple[int, int], sigma: float, std_floor: float
    ) -> None:
        super().__init__()
        self.sigma_cells = sigma * max(grid)
        self.std_floor = std_floor
        self.register_buffer("mean", torch.zeros(n_components, *grid))
        self.register_buffer("std", torch.ones(n_components, *grid))
        self.register_buffer("peak_mean", torch.full((), math.nan))
        self.register_buffer("peak_std", torch.full((), math.nan))
        self._calibrated = False
        self.register_load_state_dict_post_hook(lambda module, _: module._sync())

    def occupancy(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) soft weights -> the same blurred per component (σ in patch cells)."""
        b, k, h, w = weights.shape
        blurred = gaussian_blur(weights.float().reshape(b * k, h, w), self.sigma_cells)
        return blurred.reshape(b, k, h, w)

    @torch.no_grad()
    def fit(self, weights: torch.Tensor) -> None:
        """The training images' (N, K, h, w) soft weights -> per component and place, the mean
        and the floored std of the blurred occupancy."""
        occupancy = self.occupancy(weights)
        self.mean.copy_(occupancy.mean(0))
        self.std.copy_(occupancy.std(0).clamp_min(self.std_floor))

    def deficit(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) soft weights -> (B, h, w) the largest fall below the training occupancy,
        in training stds (uncalibrated)."""
        fall = (self.mean - self.occupancy(weights)) / self.std
        return fall.clamp_min(0.0).amax(1)

    def peaks(self, weights: torch.Tensor) -> torch.Tensor:
        """(B,) each image's :meth:`deficit` maximum (what :meth:`calibrate` takes)."""
        return self.deficit(weights).amax((-2, -1))

    @torch.no_grad()
    def calibrate(self, peaks: torch.Tensor) -> None:
        """Store the mean and std of the (N,) validation good images' :meth:`peaks` (N >= 2;
        the std floored at 1e-6)."""
        if peaks.dim() != 1 or peaks.numel() < 2 or not bool(torch.isfinite(peaks).all()):
            raise ValueError(f"expected (N >= 2,) finite peaks, got {tuple(peaks.shape)}")
        values = peaks.double()
        self.peak_mean.fill_(float(values.mean()))
        self.peak_std.fill_(max(float(values.std()), 1e-6))
        self._sync()

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        if not self._calibrated:
            raise RuntimeError(
                "the absence map is not calibrated: calibrate() it on the validation good "
                "images' peaks, or load a state_dict"
            )
        return (self.deficit(weights) - self.peak_mean) / self.peak_std

    def _sync(self) -> None:
        self._calibrated = bool(torch.isfinite(self.peak_std))
