"""Fusion of the logical and structural maps, image scores and the decision threshold (§III-C).

Each branch map is standardised with the mean and standard deviation of **all its pixel scores on
the validation split** (``BranchStats``), the two are merged with weights structural:logical = 1:3
and blurred with a Gaussian of σ = 4 px at model resolution (:func:`kernels.normalize_merge_blur`),
then resized to the original image size. The image score is the maximum of the final map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels import normalize_merge_blur

__all__ = [
    "BranchStats",
    "FusionConfig",
    "calibrate_threshold",
    "fuse_maps",
    "image_scores",
    "resize_to",
]


@dataclass(frozen=True)
class FusionConfig:
    """Fusion settings.

    ``target_false_alarm_rate`` defaults to 0.05: MVTec LOCO has only tens of validation good
    images per category, and with n images a rate can only be resolved to 1/n; 5% still lands
    inside the sample for n >= 20, while a 1% target on ~60 images is just the single largest
    validation score (see :func:`calibrate_threshold`).
    """

    structural_weight: float = 1.0
    logical_weight: float = 3.0
    sigma: float = 4.0
    target_false_alarm_rate: float = 0.05

    def __post_init__(self) -> None:
        for name in ("structural_weight", "logical_weight", "sigma"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"FusionConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.sigma == 0:
            raise ValueError("FusionConfig.sigma must be > 0")
        if self.structural_weight == 0 and self.logical_weight == 0:
            raise ValueError("FusionConfig: at least one branch weight must be > 0")
        _check_rate(self.target_false_alarm_rate)


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, int | float) and 0 <= rate < 1):
        raise ValueError(f"the target false-alarm rate must be in [0, 1), got {rate!r}")


@dataclass(frozen=True)
class BranchStats:
    """Mean and (population) standard deviation of one branch's validation pixel scores."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise ValueError(
                f"branch statistics need a finite mean and a positive finite std, got "
                f"mean={self.mean}, std={self.std} (constant or non-finite validation maps?)"
            )

    def as_tuple(self) -> tuple[float, float]:
        return (self.mean, self.std)

    @classmethod
    def fit(cls, maps: Iterable[torch.Tensor | np.ndarray]) -> BranchStats:
        """Statistics over every pixel of every map, streamed one map (or batch) at a time.

        Keeps only float64 running sums of ``x - c`` and ``(x - c)^2`` with ``c`` the mean of the
        first chunk, which avoids the cancellation of the plain sum-of-squares formula.
        """
        count, total, total_sq, shift = 0, 0.0, 0.0, None
        for chunk in maps:
            values = torch.as_tensor(chunk).detach().reshape(-1).to("cpu", torch.float64)
            if values.numel() == 0:
                continue
            if not torch.isfinite(values).all():
                raise ValueError("validation maps contain NaN or infinite values")
            if shift is None:
                shift = float(values.mean())
            centred = values - shift
            count += values.numel()
            total += float(centred.sum())
            total_sq += float(centred.pow(2).sum())
        if count == 0 or shift is None:
            raise ValueError("no validation pixel scores were given")
        offset = total / count
        variance = max(total_sq / count - offset * offset, 0.0)
        return cls(shift + offset, math.sqrt(variance))


def fuse_maps(
    logical: torch.Tensor,
    structural: torch.Tensor,
    logical_stats: BranchStats,
    structural_stats: BranchStats,
    cfg: FusionConfig | None = None,
) -> torch.Tensor:
    """(B, S, S) fused map from (B, S, S) logical and (B, h, w) structural model-resolution maps."""
    cfg = cfg or FusionConfig()
    return normalize_merge_blur(
        logical,
        structural,
        logical_stats.as_tuple(),
        structural_stats.as_tuple(),
        logical_weight=cfg.logical_weight,
        structural_weight=cfg.structural_weight,
        sigma=cfg.sigma,
    )


def resize_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps -> (B, H, W), bilinear (align_corners=False), e.g. to the original image size."""
    if maps.dim() != 3:
        raise ValueError(f"expected (B, h, w) maps, got shape {tuple(maps.shape)}")
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"size must be two positive ints (H, W), got {size!r}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    return F.interpolate(maps.float()[:, None], size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """(B,) image scores: the maximum of each (B, H, W) map."""
    if maps.dim() != 3 or maps.numel() == 0:
        raise ValueError(f"expected non-empty (B, H, W) maps, got shape {tuple(maps.shape)}")
    return maps.amax(dim=(1, 2))


def calibrate_threshold(
    validation_scores: torch.Tensor | np.ndarray | Iterable[float],
    target_false_alarm_rate: float = 0.05,
) -> float:
    """Image-score threshold from validation **good** images; an image is anomalous if score > it.

    Rule: with n validation scores sorted ascending ``s_1 <= ... <= s_n`` and
    ``a = floor(rate * n)`` allowed false alarms, the threshold is ``s_(n - a)``, so at most ``a``
    validation images (a fraction <= rate) score strictly above it. It is the empirical
    ``(1 - a/n)`` quantile. With few images the rate is resolved only in steps of 1/n: any
    ``rate < 1/n`` gives the largest validation score (no validation false alarm; for unseen good
    images the expected false-alarm rate is then about 1/(n+1), not ``rate``).
    """
    _check_rate(target_false_alarm_rate)
    if isinstance(validation_scores, torch.Tensor):
        validation_scores = validation_scores.detach().cpu().numpy()
    elif not isinstance(validation_scores, np.ndarray):
        validation_scores = list(validation_scores)
    scores = np.asarray(validation_scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("calibrate_threshold needs at least one validation score")
    if not np.isfinite(scores).all():
        raise ValueError("validation scores contain NaN or infinite values")
    ordered = np.sort(scores)
    allowed = math.floor(target_false_alarm_rate * ordered.size)
    return float(ordered[ordered.size - 1 - allowed])
