"""``FusionConfig.merge="max"``: the branches in validation image-score units, merged by a
pointwise maximum (beyond the paper, whose sum is :func:`engine.calibrate.fuse_maps`).

Each branch's standardised, blurred map is standardised again by the mean and std of its
**validation image scores** (``image_stats``), and the fused map is the pointwise maximum of the
branches (:func:`max_fuse_maps`). Pixel statistics put the branches in the same units per
pixel, but the image score is a maximum over thousands of pixels, whose spread differs from
branch to branch; in a sum the branch with the widest maxima then decides alone, and a branch
that sees nothing of an anomaly dilutes the one that does. With ``image_scale="pooled"`` the
logical and structural image scores share one std, pooled over both (:func:`fit_image_stats`):
a std from a handful of validation images is noisy, and the pooled one has twice the samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from engine.calibrate import (
    BACKGROUND_TARGETS,
    COMPOSITION_SCALES,
    IMAGE_SCALES,
    BranchStats,
    image_scores,
    peak_gate,
    placement_gate,
    standardised_maps,
)

__all__ = [
    "fit_background_scales",
    "fit_image_stats",
    "image_stats_from_scores",
    "mark_absence",
    "max_fuse_maps",
    "max_fuse_scores",
    "weigh_evidence",
]

# The paper's map branches; positional keeps a scale of its own, composition is image-level.
POOLED_BRANCHES = ("logical", "structural")


def fit_image_stats(
    branch_maps: Sequence[Mapping[str, torch.Tensor]],
    stats: Mapping[str, BranchStats],
    sigma: float,
    scale: str = "branch",
    composition_scale: str = "std",
) -> dict[str, BranchStats]:
    """Each branch's mean and std of the validation image scores of its
    :func:`standardised_maps` map, from ``branch_maps`` (chunks of (B, S, S) maps by branch).

    ``scale="pooled"``: the logical and structural branches present get one std, the root mean
    of their variances (a common scale, estimated from all their image scores); the
    composition branch, whose map is already an image score in validation stds, keeps its own.
    ``composition_scale="robust"``: the composition branch's median and scaled median absolute
    deviation instead (:class:`FusionConfig`).
    """
    standardised = [standardised_maps(chunk, stats, sigma) for chunk in branch_maps]
    branches = list(dict.fromkeys(b for chunk in standardised for b in chunk))
    scores = {b: [image_scores(chunk[b]) for chunk in standardised] for b in branches}
    return image_stats_from_scores(scores, scale, composition_scale)


def image_stats_from_scores(
    scores: Mapping[str, Sequence[torch.Tensor]],
    scale: str = "branch",
    composition_scale: str = "std",
) -> dict[str, BranchStats]:
    """:func:`fit_image_stats` from the validation image scores themselves: per branch, chunks
    of (B,) image scores of its standardised map (what the accuracy benchmark records)."""
    if scale not in IMAGE_SCALES:
        raise ValueError(f"image scale must be one of {IMAGE_SCALES}, got {scale!r}")
    if composition_scale not in COMPOSITION_SCALES:
        raise ValueError(
            f"composition scale must be one of {COMPOSITION_SCALES}, got {composition_scale!r}"
        )
    fitted = {b: BranchStats.fit(chunks) for b, chunks in scores.items()}
    if composition_scale == "robust" and "composition" in fitted:
        fitted["composition"] = _robust_stats(
            torch.cat([torch.as_tensor(c) for c in scores["composition"]]), fitted["composition"]
        )
    pooled = [b for b in POOLED_BRANCHES if b in fitted]
    if scale == "branch" or len(pooled) < 2:
        return fitted
    std = math.sqrt(sum(fitted[b].std ** 2 for b in pooled) / len(pooled))
    return {b: BranchStats(s.mean, std) if b in pooled else s for b, s in fitted.items()}


def weigh_evidence(z: torch.Tensor, weight: float, background: float = 1.0) -> torch.Tensor:
    """A branch's weight in the ``merge="max"`` units: ``weight * z`` above 0, ``background *
    z`` below.

    0 is the branch's typical peak on a good image (its validation mean image score), so only
    what lies above it is evidence. Scaling the whole map would also pull everything below it
    towards 0 with a weight under 1, lifting that branch's background over the others' in the
    maximum and spreading false positives over good pixels; the weight scales the evidence only.
    ``background`` (:func:`fit_background_scales`) stretches or shrinks the part below 0 instead,
    so that no branch's good pixels crowd the others' just under the peak.
    """
    return torch.where(z > 0, z * weight, z if background == 1.0 else z * background)


def _in_image_units(
    x: torch.Tensor, stats: BranchStats, weight: float, background: float = 1.0
) -> torch.Tensor:
    """A branch's map or image scores in validation image-score units, weighted: the one
    formula :func:`max_fuse_maps` and :func:`max_fuse_scores` share (so the second is exact)."""
    return weigh_evidence((x - stats.mean) / stats.std, weight, background)


def fit_background_scales(
    branch_maps: Sequence[Mapping[str, torch.Tensor]],
    stats: Mapping[str, BranchStats],
    image_stats: Mapping[str, BranchStats],
    weights: Mapping[str, float],
    sigma: float,
    quantile: float,
    target: str = "mean",
) -> dict[str, float]:
    """Each map branch's scale for the part of its ``merge="max"`` map below 0
    (``FusionConfig.background_quantile``), from the validation maps ``branch_maps`` (chunks of
    (B, S, S) maps by branch).

    ``p_b``, the ``quantile`` of branch b's validation pixels in image units, is where its
    background's upper tail lies: close to 0 for a branch whose good pixels spread up to its
    peak, far below for one whose background is quiet. In the pointwise maximum the broadest
    background fills the fused map's good pixels and sets every threshold at the false-positive
    rates AU-sPRO integrates (docs/ACCURACY.md, ablation 31). The scale ``p / p_b`` moves every
    branch's ``p_b`` to ``p``: with ``target="mean"`` the mean of the ``p_b`` (a quiet branch's
    background is lifted, a broad one pushed down), with ``"lowest"`` the lowest ``p_b`` (every
    scale >= 1: broad backgrounds are pushed down, none is lifted). What lies above 0 (the
    evidence, and so every anomalous image score) is untouched. Branches whose ``p_b`` is not
    below 0, the composition branch and those of weight 0 keep the scale 1; so do all when
    fewer than two branches have a background to equalise.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"background quantile must lie in (0, 1), got {quantile!r}")
    if target not in BACKGROUND_TARGETS:
        raise ValueError(f"background target must be one of {BACKGROUND_TARGETS}, got {target!r}")
    branches = [
        b
        for b in dict.fromkeys(b for chunk in branch_maps for b in chunk)
        if b != "composition" and weights.get(b, 0) != 0
    ]
    values: dict[str, list[torch.Tensor]] = {b: [] for b in branches}
    for chunk in branch_maps:
        standardised = standardised_maps({b: chunk[b] for b in branches}, stats, sigma)
        for b, m in standardised.items():
            values[b].append(_in_image_units(m, image_stats[b], weights[b]).reshape(-1).double())
    tails = {b: float(np.quantile(torch.cat(v).numpy(), quantile)) for b, v in values.items()}
    below = {b: p for b, p in tails.items() if p < 0}
    if len(below) < 2:
        return {b: 1.0 for b in branch_maps[0]} if branch_maps else {}
    goal = min(below.values()) if target == "lowest" else sum(below.values()) / len(below)
    return {b: goal / below[b] if b in below else 1.0 for b in branch_maps[0]}


def max_fuse_maps(
    maps: Mapping[str, torch.Tensor],
    stats: Mapping[str, BranchStats],
    image_stats: Mapping[str, BranchStats],
    weights: Mapping[str, float],
    sigma: float,
    gate_power: float | None = None,
    capped: Sequence[str] = (),
    backgrounds: Mapping[str, float] | None = None,
    placement: torch.Tensor | None = None,
    placement_power: float | None = None,
) -> torch.Tensor:
    """(B, S, S) fused map of ``FusionConfig.merge="max"``.

    Each branch's :func:`standardised_maps` map ``m_b`` becomes
    ``a_b = (m_b - image_mean_b) / image_std_b``, weighted by :func:`weigh_evidence` (``w_b``
    times the part above 0), with ``image_stats`` the mean and std of ``max(m_b)`` over the
    validation good images, so every branch's image score is in validation standard deviations
    of its own. The map is the pointwise maximum of the ``a_b`` of the map branches; the
    composition branch's ``a_c`` (one number per image) raises the image's peak to ``a_c``
    where it is larger, spread by the gate ``g ** gate_power`` (``g``: the maximum map rescaled
    to [0, 1]), so the image score is exactly the largest ``a_b`` of all branches. Without
    ``gate_power`` it is a floor under every pixel. A map branch in ``capped``
    (``FusionConfig.positional_role="shape"``) is first cut at what the image scores without
    it (the larger of the other map branches' peak and ``a_c``): it places evidence within the
    image but never raises its score. ``backgrounds``: each branch's scale of the part below
    0 (:func:`fit_background_scales`; default 1). Branches of weight 0 are left out. With
    ``placement_power`` the gate is the larger of the peak gate and
    :func:`~engine.calibrate.placement_gate` of ``placement`` (B, S, S), the composition
    model's placement map (``FusionConfig.placement_power``); the gate is still 1 at the peak
    and at most 1 elsewhere, so the image score stays exactly the same.
    """
    if placement_power is not None and (gate_power is None or placement is None):
        raise ValueError("placement_power needs gate_power and the composition placement map")
    missing = [b for b in maps if b not in stats or b not in image_stats or b not in weights]
    if missing:
        raise ValueError(f"no statistics, image statistics or weight for branch(es) {missing}")
    used = {b: maps[b] for b in maps if weights[b] != 0}
    if not used:
        raise ValueError("every branch has weight 0: nothing to fuse")
    below = backgrounds or {}
    scaled = {
        b: _in_image_units(m, image_stats[b], weights[b], below.get(b, 1.0))
        for b, m in standardised_maps(used, stats, sigma).items()
    }
    composition = scaled.pop("composition", None)
    shaping = [scaled.pop(b) for b in capped if b in scaled]
    if not scaled:
        if shaping:
            raise ValueError(f"capped branch(es) {list(capped)} need another map branch")
        assert composition is not None
        return composition
    fused = torch.stack(list(scaled.values())).amax(dim=0)
    if shaping:  # cut at the image's score: the others' peak, or the composition evidence
        peak = fused.amax(dim=(-2, -1), keepdim=True)
        if composition is not None:
            peak = peak.maximum(composition.amax(dim=(-2, -1), keepdim=True))
        fused = fused.maximum(torch.stack(shaping).amax(dim=0).minimum(peak))
    if composition is None:
        return fused
    if gate_power is None:
        return torch.maximum(fused, composition)
    top = fused.amax(dim=(-2, -1), keepdim=True)
    gate = peak_gate(fused, gate_power)
    if placement_power is not None:
        assert placement is not None
        gate = gate.maximum(placement_gate(placement, placement_power))
    return fused + (composition - top).clamp_min(0.0) * gate


def mark_absence(fused: torch.Tensor, absence: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, S, S) ``fused`` raised to ``weight * absence`` where the absence map (B, S, S), in
    its validation image-score units, lies above 0, cut at each image's score
    (``FusionConfig.absence_weight``). Only what lies above the map's typical good-image peak is
    used: its values below would lift the good images' backgrounds. The image score (the maximum)
    does not change."""
    peak = fused.amax(dim=(-2, -1), keepdim=True)
    marked = torch.where(absence > 0, (weight * absence).minimum(peak), fused)
    return fused.maximum(marked)


def max_fuse_scores(
    scores: Mapping[str, torch.Tensor],
    image_stats: Mapping[str, BranchStats],
    weights: Mapping[str, float],
    capped: Sequence[str] = (),
    backgrounds: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """The image scores of :func:`max_fuse_maps` from each branch's (B,) image scores (the
    maxima of its standardised maps): ``max_b`` of ``(s_b - image_mean_b) / image_std_b``
    weighted by :func:`weigh_evidence`, over the branches of non-zero weight not in ``capped``.
    Exact, since every term is a per-branch maximum (the weighting, background scale included,
    is monotone), a capped branch never exceeds the others' score and the gated composition
    evidence lifts the peak to exactly its own value."""
    used = [b for b in scores if weights[b] != 0 and b not in capped]
    if not used:
        raise ValueError("every branch has weight 0: nothing to fuse")
    below = backgrounds or {}
    scaled = [
        _in_image_units(scores[b].double(), image_stats[b], weights[b], below.get(b, 1.0))
        for b in used
    ]
    return torch.stack(scaled).amax(dim=0)


def _robust_stats(scores: torch.Tensor, moments: BranchStats) -> BranchStats:
    """Median and 1.4826 x median absolute deviation of ``scores``; ``moments`` (mean and std)
    when half or more of them are one value, which leaves no deviation to measure."""
    values = scores.double()
    median = values.quantile(0.5)  # the mean of the middle two of an even count, as numpy's
    spread = 1.4826 * float((values - median).abs().quantile(0.5))
    return BranchStats(float(median), spread) if spread > 0 else moments
