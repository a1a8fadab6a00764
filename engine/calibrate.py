"""Fusion of the branch maps, image scores and the decision threshold (paper §III-C).

Each branch map (logical, structural and, when enabled, positional and composition) is
standardised with the mean and standard deviation of **all its pixel scores on the validation
split** (``BranchStats``), the maps are merged with weights (paper: structural:logical = 1:3) and
blurred with a Gaussian of σ = 4 px at a 256-px map, scaled with the map size
(:func:`kernels.normalize_merge_blur`), then resized to the original image size. The image score
is the maximum of the final map.

``FusionConfig.merge="max"`` (beyond the paper) merges the branches in validation image-score
units by a pointwise maximum: :mod:`engine.max_merge`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kernels import normalize_merge_blur

__all__ = [
    "BranchStats",
    "FusionConfig",
    "calibrate_threshold",
    "finite_threshold",
    "fuse_maps",
    "gated_composition",
    "image_scores",
    "peak_gate",
    "placement_gate",
    "resize_to",
    "standardised_maps",
]

# Map branches first; composition (an image-level score) last.
BRANCHES = ("logical", "structural", "positional", "composition")
MERGES = ("sum", "max")
IMAGE_SCALES = ("branch", "pooled")
COMPOSITION_SCALES = ("std", "robust")
POSITIONAL_ROLES = ("score", "shape")
BACKGROUND_TARGETS = ("mean", "lowest")
# the key of the composition model's placement map beside the branch maps (not a branch)
PLACEMENT = "placement"
# the key of the composition model's absence map beside the branch maps (not a branch)
ABSENCE = "absence"
SIGMA_REFERENCE_SIZE = 256  # FusionConfig.sigma is in pixels of a map of this side


@dataclass(frozen=True)
class FusionConfig:
    """Fusion settings.

    ``*_weight``: each branch's weight in the merged map (paper: structural 1, logical 3; the
    positional and composition weights apply only when those branches are enabled). With
    ``merge="max"`` a weight scales only what lies above the branch's typical good-image peak
    (:func:`weigh_evidence`). ``sigma``: the Gaussian's σ in pixels of a 256-px map; a map of
    side S is blurred with
    ``sigma * S / 256`` (RD4AD and PatchCore use σ = 4 at 256 px, so the blur keeps its size
    relative to the image). At the cpu preset σ = 1-3 raised image AUROC by at most 0.003 and
    lowered AU-sPRO; σ = 6-8 lowered both (docs/ACCURACY.md, ablation 18), so 4 stays.

    ``merge``: ``"sum"`` (the paper: the weighted sum of the pixel-standardised maps, blurred)
    or ``"max"`` (the pointwise maximum of the blurred maps, each standardised by its
    validation image scores and weighted; see the module docstring and :func:`max_fuse_maps`).
    ``image_scale`` (``"max"`` only): ``"branch"`` divides each branch by its own validation
    image-score std, ``"pooled"`` the logical and structural branches by one std pooled over
    both (:func:`fit_image_stats`). The defaults are the paper's sum; the ``cpu`` preset uses
    ``"max"`` with ``"pooled"`` (docs/ACCURACY.md, ablation 3: over five seeds the pooled max
    never scored below the sum; with each branch's own std it lost on two).
    ``composition_scale`` (``"max"`` only): how the composition branch's validation image
    scores are summarised, ``"std"`` by their mean and std, ``"robust"`` by their median and
    1.4826 x their median absolute deviation (the std of a normal sample, unmoved by a few
    outliers). A composition score is the distance of an image's layout to the training
    layouts: a rare but normal layout puts a few validation images far out (4-6 std, the rest
    within 0.2), a std inflated by them shrinks every anomaly's evidence, and the maximum
    over branches then loses the count anomalies only this branch sees (docs/ACCURACY.md).

    ``positional_role`` (``"max"`` only): ``"score"`` merges the positional map like the other
    map branches; ``"shape"`` cuts it at the score the image has without it (the other
    branches' largest evidence), so it shapes the fused map (where in the image) but never
    raises the image score (:func:`max_fuse_maps`). Where parts may lie anywhere the positional
    memory's good images have a heavy tail of image scores, while its localisation still helps
    (docs/ACCURACY.md, ablation 32).

    ``background_quantile`` (``"max"`` only; None: off): each map branch's part below its
    typical good-image peak is scaled so that this quantile of its validation pixels lands where
    the branches' mean of it lies (``background_target="mean"``) or where the lowest of them lies
    (``"lowest"``: broad backgrounds are pushed down, none is lifted)
    (:func:`engine.max_merge.fit_background_scales`). The image scores of anomalous images do
    not move; the fused map's good pixels are no longer set by the one branch whose background
    reaches closest to its peak (docs/ACCURACY.md, ablations 31, 35, 36).

    ``placement_power`` (``"max"`` with the composition branch gated; None: off): the
    composition evidence goes, besides the other branches' peak, where the composition model's
    components carry its distance: the gate is the larger of the peak gate and the model's
    placement map (:meth:`engine.models.composition.CompositionModel.forward`) rescaled to
    [0, 1] per image, to this power (:func:`placement_gate`). A part miscounted away from where
    the other branches peak is then marked where it lies; image scores do not move. A higher
    power keeps the placed evidence on the densest components only: at the cpu preset (which
    uses 16) over seeds 20-22, AU-sPRO@0.05 +0.015 / +0.017 / +0.016 at powers 4 / 8 / 16,
    juice_bottle -0.023 / -0.013 / -0.009 (in its logical subset: part of the evidence lands
    away from the defect, cause not verified) (docs/ACCURACY.md, ablations 47-50).

    ``absence_weight`` (``"max"`` with the composition model's absence map,
    ``CompositionConfig.absence_sigma``): where that map lies above its typical good-image peak
    (where a part is missing), the fused map is raised to this weight times it, cut at the
    image's score (:func:`engine.max_merge.mark_absence`). A missing part then shows where it is
    missing; image scores do not move; the map's values below its peak are not used.

    ``target_false_alarm_rate`` defaults to 0.05: MVTec LOCO has only tens of validation good
    images per category, and with n images a rate can only be resolved to 1/n; 5% still lands
    inside the sample for n >= 20, while a 1% target on ~60 images is just the single largest
    validation score (see :func:`calibrate_threshold`).
    """

    structural_weight: float = 1.0
    logical_weight: float = 3.0
    composition_weight: float = 1.0
    positional_weight: float = 1.0
    sigma: float = 4.0
    target_false_alarm_rate: float = 0.05
    merge: str = "sum"
    image_scale: str = "branch"
    composition_scale: str = "std"
    positional_role: str = "score"
    background_quantile: float | None = None
    background_target: str = "mean"
    placement_power: float | None = None
    absence_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "structural_weight",
            "logical_weight",
            "composition_weight",
            "positional_weight",
            "absence_weight",
            "sigma",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"FusionConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.sigma == 0:
            raise ValueError("FusionConfig.sigma must be > 0")
        if self.structural_weight == 0 and self.logical_weight == 0:
            raise ValueError("FusionConfig: at least one branch weight must be > 0")
        _check_rate(self.target_false_alarm_rate)
        if self.merge not in MERGES:
            raise ValueError(f"FusionConfig.merge must be one of {MERGES}, got {self.merge!r}")
        if self.image_scale not in IMAGE_SCALES:
            raise ValueError(
                f"FusionConfig.image_scale must be one of {IMAGE_SCALES}, got {self.image_scale!r}"
            )
        if self.composition_scale not in COMPOSITION_SCALES:
            raise ValueError(
                f"FusionConfig.composition_scale must be one of {COMPOSITION_SCALES}, "
                f"got {self.composition_scale!r}"
            )
        if self.positional_role not in POSITIONAL_ROLES:
            raise ValueError(
                f"FusionConfig.positional_role must be one of {POSITIONAL_ROLES}, "
                f"got {self.positional_role!r}"
            )
        q = self.background_quantile
        if q is not None and not (isinstance(q, int | float) and 0 < q < 1):
            raise ValueError(
                f"FusionConfig.background_quantile must be None or in (0, 1), got {q!r}"
            )
        p = self.placement_power
        if p is not None and not (isinstance(p, int | float) and 0 < p <= 64):
            raise ValueError(f"FusionConfig.placement_power must be None or in (0, 64], got {p!r}")
        if self.background_target not in BACKGROUND_TARGETS:
            raise ValueError(
                f"FusionConfig.background_target must be one of {BACKGROUND_TARGETS}, "
                f"got {self.background_target!r}"
            )

    @property
    def capped(self) -> tuple[str, ...]:
        """The map branches cut at the image's score without them (:func:`max_fuse_maps`);
        none with ``merge="sum"``, which ``positional_role`` does not apply to."""
        return ("positional",) if self.positional_role == "shape" and self.merge == "max" else ()

    @property
    def equalised_background(self) -> float | None:
        """``background_quantile`` where it applies (``merge="max"``), else None."""
        return self.background_quantile if self.merge == "max" else None

    @property
    def component_placement(self) -> float | None:
        """``placement_power`` where it applies (``merge="max"``), else None."""
        return self.placement_power if self.merge == "max" else None

    def weight(self, branch: str) -> float:
        """The configured weight of ``branch`` (one of :data:`BRANCHES`)."""
        if branch not in BRANCHES:
            raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES}")
        return float(getattr(self, f"{branch}_weight"))

    def sigma_at(self, side: int) -> float:
        """σ in pixels for a map of side ``side`` (σ scales with the map size)."""
        return self.sigma * side / SIGMA_REFERENCE_SIZE


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, int | float) and 0 <= rate < 1):
        raise ValueError(f"the target false-alarm rate must be in [0, 1), got {rate!r}")


def finite_threshold(value: Any, what: str = "threshold") -> float:
    """``value`` as a float, or ValueError: a NaN or infinite threshold would pass every frame."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r} (it would pass every frame)")
    return float(value)


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
    maps: Mapping[str, torch.Tensor],
    stats: Mapping[str, BranchStats],
    weights: Mapping[str, float],
    sigma: float,
    gate_power: float | None = None,
    gate_after_blur: bool = False,
) -> torch.Tensor:
    """(B, S, S) fused map: ``blur_sigma(sum_b w_b * (maps_b - mean_b) / std_b)``.

    ``maps``: same-size (B, S, S) model-resolution maps by branch name; ``stats`` and
    ``weights`` must hold every branch of ``maps``; branches of weight 0 are left out. ``sigma``
    is in pixels of these maps (see :meth:`FusionConfig.sigma_at`). With ``gate_power`` the
    composition map (its image score at every pixel) is placed where the other branches see
    the anomaly (:func:`gated_composition`): on their merged map before the blur, or with
    ``gate_after_blur`` on their blurred fused map, added after the blur, so that the image
    score rises by exactly the composition evidence (the blur would spread the narrow gated
    peak and scale it down by an amount that depends on the peak's shape).
    """
    missing = [b for b in maps if b not in stats or b not in weights]
    if missing:
        raise ValueError(f"no statistics or weight for branch(es) {missing}")
    used = [b for b in maps if weights[b] != 0]
    if not used:
        raise ValueError("every branch has weight 0: nothing to fuse")
    affines = {b: (float(weights[b]), *stats[b].as_tuple()) for b in used}
    inputs = {b: maps[b] for b in used}
    if gate_power is None or "composition" not in inputs or len(inputs) == 1:
        return normalize_merge_blur(list(inputs.values()), list(affines.values()), sigma=sigma)
    composition, weight = inputs.pop("composition"), affines.pop("composition")[0]
    if gate_after_blur:
        fused = normalize_merge_blur(list(inputs.values()), list(affines.values()), sigma=sigma)
        return fused + weight * gated_composition(
            composition, stats["composition"], fused, gate_power
        )
    base = sum(w * (inputs[b].float() - mean) / std for b, (w, mean, std) in affines.items())
    assert isinstance(base, torch.Tensor)
    inputs["composition"] = gated_composition(composition, stats["composition"], base, gate_power)
    affines["composition"] = (weight, 0.0, 1.0)
    return normalize_merge_blur(list(inputs.values()), list(affines.values()), sigma=sigma)


def standardised_maps(
    maps: Mapping[str, torch.Tensor], stats: Mapping[str, BranchStats], sigma: float
) -> dict[str, torch.Tensor]:
    """Each (B, S, S) branch map standardised by its pixel statistics and blurred with
    ``sigma``: the map the branch alone yields (its maximum is its image score). The
    composition map, the image score at every pixel, is only standardised: blurring a
    constant changes nothing."""
    missing = [b for b in maps if b not in stats]
    if missing:
        raise ValueError(f"no statistics for branch(es) {missing}")
    out = {}
    for branch, values in maps.items():
        mean, std = stats[branch].as_tuple()
        if branch == "composition":
            out[branch] = (values.float() - mean) / std
        else:
            out[branch] = normalize_merge_blur([values], [(1.0, mean, std)], sigma=sigma)
    return out


def gated_composition(
    composition: torch.Tensor, stats: BranchStats, base: torch.Tensor, power: float
) -> torch.Tensor:
    """The composition evidence placed where the other branches point: (B, S, S).

    ``z = max(0, (score - mean) / std)`` (the image's composition score above the validation
    mean, in validation standard deviations) times ``g ** power``, with ``g`` the other
    branches' merged normalised map ``base`` rescaled to [0, 1] per image. The image's most
    anomalous region gains ``z``, normal regions almost nothing: a map that is the score
    everywhere raises every pixel of an image whose parts are miscounted and costs AU-sPRO
    (docs/ACCURACY.md).
    """
    z = ((composition.float() - stats.mean) / stats.std).clamp_min(0.0)
    return z * peak_gate(base, power)


def peak_gate(base: torch.Tensor, power: float) -> torch.Tensor:
    """``g ** power`` with ``g`` each (B, S, S) map of ``base`` rescaled to [0, 1] per image:
    1 at the image's most anomalous pixel, near 0 away from it; 1 everywhere on a flat map
    (no place is preferred, and the evidence must not vanish)."""
    unit, span = _unit_range(base)
    gate = unit**power
    return torch.where(span > 0, gate, torch.ones_like(gate))


def placement_gate(placement: torch.Tensor, power: float) -> torch.Tensor:
    """``g ** power`` with ``g`` each (B, S, S) map of ``placement`` rescaled to [0, 1] per
    image; 0 everywhere on a flat map (it places nothing, and :func:`peak_gate` still does)."""
    return _unit_range(placement)[0] ** power


def _unit_range(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (B, S, S) map rescaled to [0, 1] per image (0 on a flat map), and its (B, 1, 1)
    span (max - min)."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return (maps - low) / span.clamp_min(1e-12), span


def resize_to(maps: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """(B, h, w) maps -> (B, H, W), bilinear (align_corners=False), e.g. to the original image
    size. ``antialias`` low-pass filters when shrinking (a map brought down to a smaller grid)."""
    if maps.dim() != 3:
        raise ValueError(f"expected (B, h, w) maps, got shape {tuple(maps.shape)}")
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"size must be two positive ints (H, W), got {size!r}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    shrinks = antialias and (size[0] < maps.shape[-2] or size[1] < maps.shape[-1])
    return F.interpolate(
        maps.float()[:, None], size=size, mode="bilinear", align_corners=False, antialias=shrinks
    )[:, 0]


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
