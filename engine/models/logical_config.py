"""Configuration of the logical module (paper §III-A): :class:`LogicalConfig` and the cpu
preset. Kept apart from the model so that configs load without building any network."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

FEATURE_LOSSES = ("pixel", "flat")
BOTTLENECK_INPUTS = ("last", "fused")
CODEBOOK_INITS = ("kmeans", "batch")


@dataclass(frozen=True)
class LogicalConfig:
    """Logical-module settings. Paper values: backbone, codebook size 16, loss weights 1,
    LeWin window 8 (Uformer); the rest are documented defaults (gap notes §1.5–1.8).

    Channel widths of the OCE, bridge and decoding stages come from the backbone; only the
    internal widths below (codebook, context, fusion) are free choices.

    ``decoder_blocks`` lists the de-ResNet blocks per compared level, in the order of
    ``compared_levels``; (6, 4, 3) is RD4AD's de-WideResNet-50 (fine to coarse).

    ``bottleneck_input``: what the OCE compresses. ``"last"``: the bottleneck level alone (the
    paper's wording); ``"fused"``: RD4AD-style multi-scale fusion, every compared level pooled to
    the bottleneck level's grid, projected and concatenated with it, so the bottleneck carries
    the image at every scale (docs/ACCURACY.md: with ``"last"`` the coarse decoder levels
    collapse into a fixed template). ``oce_strides``: the strides of the OCE's two convolutions
    (paper: 2 and 2; a 4×4 layer4 map at 128 px becomes 1×1 with them, so the cpu preset uses
    1 and 1). ``codebook_init``: ``"kmeans"`` over the first training batches' atrous output
    (training mode), or ``"batch"``: entries drawn from the first batch. ``codebook_restart``:
    move entries unused for a whole epoch onto recent vectors.

    ``feature_loss``: ``"pixel"`` (default) is the mean over pixels of 1 − cos over channels,
    the very quantity the anomaly map scores, so training lowers the normal-image map at every
    pixel, including low-norm background pixels that RD4AD's ``"flat"`` form (one cosine over
    the flattened C·H·W vector, dominated by high-norm pixels) leaves loosely reconstructed.
    """

    backbone: str = "resnet101"
    compared_levels: tuple[str, ...] = ("layer1", "layer2", "layer3")
    bottleneck_level: str = "layer4"
    image_size: int = 256
    codebook_size: int = 16
    codebook_dim: int = 256
    commitment_beta: float = 0.25
    atrous_dilations: tuple[int, ...] = (1, 2, 4)
    learned_text_dim: int = 512
    context_dim: int = 64
    fusion_width: int = 256
    lewin_window: int = 8
    lewin_depth: int = 2
    lewin_head_dim: int = 32
    lewin_mlp_ratio: float = 4.0
    decoder_blocks: tuple[int, ...] = (6, 4, 3)
    feature_loss: str = "pixel"
    feature_weight: float = 1.0
    image_weight: float = 1.0
    vq_weight: float = 1.0
    bottleneck_input: str = "last"
    oce_strides: tuple[int, int] = (2, 2)
    codebook_init: str = "kmeans"
    codebook_restart: bool = True

    def __post_init__(self) -> None:
        # Accept lists (configs read back from JSON manifests).
        for name in ("compared_levels", "atrous_dilations", "decoder_blocks", "oce_strides"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.compared_levels:
            raise ValueError("compared_levels must name at least one level")
        if self.bottleneck_level in self.compared_levels:
            raise ValueError(
                f"bottleneck_level {self.bottleneck_level!r} must not be a compared level"
            )
        if len(self.decoder_blocks) != len(self.compared_levels):
            raise ValueError(
                f"decoder_blocks {self.decoder_blocks} needs one entry per compared level "
                f"{self.compared_levels}"
            )
        if self.bottleneck_input not in BOTTLENECK_INPUTS:
            raise ValueError(
                f"bottleneck_input must be one of {BOTTLENECK_INPUTS}, got {self.bottleneck_input!r}"
            )
        if len(self.oce_strides) != 2 or any(s not in (1, 2) for s in self.oce_strides):
            raise ValueError(f"oce_strides must be two values of 1 or 2, got {self.oce_strides}")
        if self.codebook_init not in CODEBOOK_INITS:
            raise ValueError(
                f"codebook_init must be one of {CODEBOOK_INITS}, got {self.codebook_init!r}"
            )
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(
                f"feature_loss must be one of {FEATURE_LOSSES}, got {self.feature_loss!r}"
            )
        positive = ("image_size", "codebook_size", "codebook_dim", "learned_text_dim")
        positive += ("context_dim", "fusion_width", "lewin_window", "lewin_depth", "lewin_head_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("commitment_beta", "feature_weight", "image_weight", "vq_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite non-negative number, got {value}")
        if any(b < 1 for b in self.decoder_blocks):
            raise ValueError(f"decoder_blocks must be positive, got {self.decoder_blocks}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LogicalConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown LogicalConfig fields: {sorted(unknown)}")
        return cls(**values)


def cpu_preset() -> LogicalConfig:
    """Small logical module that trains on a ~60-image category in minutes on 2 CPU cores.

    EfficientNet-Lite0 (real offline weights), 128 px, narrow fusion/codebook widths, one
    de-ResNet block per level and one LeWin block pair per stage. The OCE keeps the 4×4 grid of
    the fused bottleneck input (strides 1, 1): the paper's two stride-2 convolutions would leave
    a 1×1 bottleneck at 128 px (docs/ACCURACY.md). Pair it with
    :func:`engine.train.cpu_train_preset`.
    """
    return LogicalConfig(
        backbone="efficientnet_lite0",
        image_size=128,
        bottleneck_input="fused",
        oce_strides=(1, 1),
        codebook_dim=32,
        context_dim=16,
        learned_text_dim=64,
        fusion_width=64,
        decoder_blocks=(1, 1, 1),
    )
