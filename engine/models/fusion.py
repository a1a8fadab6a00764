"""The calibrated fusion as an ``nn.Module``: its state travels in the state dict.

What calibration finds (each branch's validation mean and std, with ``merge="max"`` also those
of its validation image scores, and the decision threshold) and the branch weights are buffers
of :class:`Fusion`, so they move with ``.to(device)``, are saved by ``state_dict`` and become
constants of any graph traced through the module. The arithmetic is
:func:`engine.calibrate.fuse_maps` or :func:`engine.max_merge.max_fuse_maps` (tested there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.calibrate import (
    ABSENCE,
    BRANCHES,
    MERGES,
    PLACEMENT,
    BranchStats,
    FusionConfig,
    finite_threshold,
    fuse_maps,
)
from engine.max_merge import mark_absence, max_fuse_maps
from engine.models.composition import CompositionConfig

__all__ = ["Fusion"]


@dataclass(frozen=True)
class _HostValues:
    """The buffers as Python values: read once per change, so a frame never waits on the
    device to learn its own calibration."""

    stats: dict[str, BranchStats] | None
    image_stats: dict[str, BranchStats] | None
    weights: dict[str, float]
    backgrounds: dict[str, float]
    threshold: float | None


class Fusion(nn.Module):
    """Standardise, weigh, merge and blur same-size branch maps (paper §III-C).

    Args:
        branches: the branch names fused, in :data:`engine.calibrate.BRANCHES` order.
        weights: each branch's weight in the merged map.
        sigma: the Gaussian's σ in pixels of the maps fused (see ``FusionConfig.sigma_at``).
        gate_power: with a composition branch, where its evidence goes; None spreads it over
            every pixel.
        gate_after_blur: with ``merge="sum"``, add the gated composition evidence after the
            blur (``"max"`` always gates on the blurred maps).
        merge: ``"sum"`` or ``"max"`` (see :class:`engine.calibrate.FusionConfig`).
        capped: with ``merge="max"``, the map branches cut at the image's score without them
            (``FusionConfig.positional_role``).
        background_quantile: with ``merge="max"``, the validation quantile at which the
            branches' backgrounds are equalised (``FusionConfig.background_quantile``); None:
            not.
        placement_power: with ``merge="max"`` and ``gate_power``, the composition evidence is
            also placed by the composition model's placement map to this power
            (``FusionConfig.placement_power``); None: by the peak gate only.
        absence_weight: with ``merge="max"``, the composition model's absence map is marked
            with this weight (``FusionConfig.absence_weight``); None: not used.

    Buffers (float64, so they hold the manifest's numbers exactly): ``mean``, ``std``,
    ``image_mean``, ``image_std`` (``merge="max"`` only), ``weight`` and ``background`` (each
    branch's scale of its part below 0, 1 unless ``background_quantile`` is set), each (N,) in
    ``branches`` order, and the scalar ``threshold`` (an image is anomalous when its score is
    above it). All but ``weight`` and ``background`` are NaN until :meth:`calibrate` /
    :meth:`set_threshold` or ``load_state_dict`` fill them. Change them through those, not in
    place: the Python copies the forward pass reads are refreshed there.

    ``forward(maps)``: branch name -> (B, S, S) map, every branch of ``branches`` present, and
    with ``placement_power`` the composition model's placement map under
    :data:`engine.calibrate.PLACEMENT` and with ``absence_weight`` the absence map under
    :data:`engine.calibrate.ABSENCE` -> (B, S, S) float32 fused map.
    """

    mean: torch.Tensor
    std: torch.Tensor
    image_mean: torch.Tensor
    image_std: torch.Tensor
    weight: torch.Tensor
    background: torch.Tensor
    threshold: torch.Tensor

    def __init__(
        self,
        branches: Sequence[str],
        weights: Mapping[str, float],
        sigma: float,
        gate_power: float | None = None,
        gate_after_blur: bool = False,
        merge: str = "sum",
        capped: Sequence[str] = (),
        background_quantile: float | None = None,
        placement_power: float | None = None,
        absence_weight: float | None = None,
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
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if capped and merge != "max":
            raise ValueError("capped branches need merge='max'")
        if background_quantile is not None and merge != "max":
            raise ValueError("background_quantile needs merge='max'")
        if placement_power is not None and (merge != "max" or gate_power is None):
            raise ValueError("placement_power needs merge='max' and a gated composition branch")
        if absence_weight is not None and (merge != "max" or "composition" not in branches):
            raise ValueError("absence_weight needs merge='max' and the composition branch")
        self.branches = tuple(branches)
        self.sigma = float(sigma)
        self.gate_power = gate_power
        self.gate_after_blur = gate_after_blur
        self.merge = merge
        self.capped = tuple(b for b in capped if b in self.branches)
        self.background_quantile = background_quantile
        self.placement_power = placement_power
        self.absence_weight = absence_weight
        nan = torch.full((len(branches),), math.nan, dtype=torch.float64)
        for name in ("mean", "std", "image_mean", "image_std"):
            self.register_buffer(name, nan.clone())
        self.register_buffer("weight", self._column([float(weights[b]) for b in branches]))
        self.register_buffer("background", torch.ones(len(branches), dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        self._host: _HostValues | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._forget())

    @classmethod
    def from_config(
        cls,
        config: FusionConfig,
        branches: Sequence[str],
        map_size: int,
        composition: CompositionConfig | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> Fusion:
        """The uncalibrated fusion of ``branches`` for maps of side ``map_size``: σ scaled to
        that size, the composition evidence placed as ``composition.fused_map`` says and its
        absence map marked (when that branch is fused), ``weights`` (default: the config's)."""
        gate_power, after_blur, placement_power, absence_weight = None, False, None, None
        composed = composition is not None and "composition" in branches
        if composed and composition.fused_map != "image":
            gate_power = composition.gate_power
            after_blur = composition.fused_map == "gated_after_blur"
            placement_power = config.component_placement
        if composed and composition.absence_sigma is not None and config.merge == "max":
            absence_weight = config.absence_weight
        return cls(
            branches,
            weights or {b: config.weight(b) for b in branches},
            config.sigma_at(map_size),
            gate_power,
            after_blur,
            config.merge,
            config.capped,
            config.equalised_background,
            placement_power,
            absence_weight,
        )

    def calibrate(
        self,
        stats: Mapping[str, BranchStats],
        image_stats: Mapping[str, BranchStats] | None = None,
        backgrounds: Mapping[str, float] | None = None,
    ) -> None:
        """Store each branch's validation pixel statistics and, required for ``merge="max"``,
        those of its validation image scores (maxima of
        :func:`engine.calibrate.standardised_maps`) and, required with ``background_quantile``,
        each branch's background scale (:func:`engine.max_merge.fit_background_scales`)."""
        if image_stats is None and self.merge == "max":
            raise ValueError("merge='max' needs the branches' image statistics")
        if (backgrounds is None) != (self.background_quantile is None):
            raise ValueError(
                "background scales are given exactly when background_quantile is set "
                f"(it is {self.background_quantile})"
            )
        given: dict[str, Mapping[str, object]] = {"statistics": stats}
        if image_stats is not None:
            given["image statistics"] = image_stats
        if backgrounds is not None:
            given["background scales"] = backgrounds
            bad = {b: s for b, s in backgrounds.items() if not (math.isfinite(s) and s > 0)}
            if bad:
                raise ValueError(f"background scales must be finite and > 0, got {bad}")
        for name, values in given.items():
            missing = [b for b in self.branches if b not in values]
            if missing:
                raise ValueError(f"no {name} for branch(es) {missing}")
        with torch.no_grad():
            self.mean.copy_(self._column([stats[b].mean for b in self.branches]))
            self.std.copy_(self._column([stats[b].std for b in self.branches]))
            if image_stats is not None:
                self.image_mean.copy_(self._column([image_stats[b].mean for b in self.branches]))
                self.image_std.copy_(self._column([image_stats[b].std for b in self.branches]))
            if backgrounds is not None:
                self.background.copy_(self._column([backgrounds[b] for b in self.branches]))
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
    def image_stats(self) -> dict[str, BranchStats] | None:
        """Each branch's validation image-score statistics, or None (``merge="sum"``)."""
        return self._values().image_stats

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._values().weights)

    @property
    def backgrounds(self) -> dict[str, float] | None:
        """Each branch's background scale, or None without ``background_quantile``."""
        if self.background_quantile is None:
            return None
        return dict(self._values().backgrounds)

    @property
    def threshold_value(self) -> float | None:
        """The decision threshold as a float, or None before it is set."""
        return self._values().threshold

    def forward(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        placement = maps.get(PLACEMENT)
        if self.placement_power is not None and placement is None:
            raise ValueError(
                f"this fusion places the composition evidence by the composition model's "
                f"placement map: the maps need {PLACEMENT!r} (Maps.fusion_inputs())"
            )
        absence = maps.get(ABSENCE)
        if self.absence_weight is not None and absence is None:
            raise ValueError(
                f"this fusion marks the composition model's absence map: the maps need "
                f"{ABSENCE!r} (Maps.fusion_inputs())"
            )
        maps = {b: m for b, m in maps.items() if b not in (PLACEMENT, ABSENCE)}
        values = self._values()
        if values.stats is None:
            raise RuntimeError("the fusion is not calibrated: branch statistics are missing")
        if self.merge == "sum":
            return fuse_maps(
                maps,
                values.stats,
                values.weights,
                self.sigma,
                self.gate_power,
                self.gate_after_blur,
            )
        if values.image_stats is None:
            raise RuntimeError(
                "the fusion is not calibrated: merge='max' needs the branches' image statistics"
            )
        fused = max_fuse_maps(
            maps,
            values.stats,
            values.image_stats,
            values.weights,
            self.sigma,
            self.gate_power,
            self.capped,
            values.backgrounds,
            placement,
            self.placement_power,
        )
        if self.absence_weight is None:
            return fused
        assert absence is not None
        return mark_absence(fused, absence, self.absence_weight)

    def extra_repr(self) -> str:
        return (
            f"branches={self.branches}, sigma={self.sigma:g}, gate_power={self.gate_power}, "
            f"gate_after_blur={self.gate_after_blur}, merge={self.merge!r}, "
            f"capped={self.capped}, background_quantile={self.background_quantile}, "
            f"placement_power={self.placement_power}, absence_weight={self.absence_weight}"
        )

    @staticmethod
    def _column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    def _forget(self) -> None:
        self._host = None

    def _values(self) -> _HostValues:
        if self._host is None:
            threshold = float(self.threshold)
            self._host = _HostValues(
                self._stats(self.mean, self.std),
                self._stats(self.image_mean, self.image_std),
                dict(zip(self.branches, self.weight.tolist(), strict=True)),
                dict(zip(self.branches, self.background.tolist(), strict=True)),
                threshold if math.isfinite(threshold) else None,
            )
        return self._host

    def _stats(self, mean: torch.Tensor, std: torch.Tensor) -> dict[str, BranchStats] | None:
        means, stds = mean.tolist(), std.tolist()
        if not all(math.isfinite(v) for v in means + stds):
            return None
        return {b: BranchStats(m, s) for b, m, s in zip(self.branches, means, stds, strict=True)}
