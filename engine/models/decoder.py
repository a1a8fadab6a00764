"""RD4AD-style de-ResNet decoding blocks: bottlenecks whose first block upsamples ×2.

The upsampling block replaces the strided 3×3 convolution of a ResNet bottleneck, and the
strided 1×1 of its shortcut, by 2×2 stride-2 transposed convolutions. Output widths are free,
so a stage reproduces exactly the channel count of whatever encoder level it mirrors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


def bottleneck_width(out_channels: int) -> int:
    """ResNet bottleneck width (expansion 4), kept at 16 or more for narrow backbones."""
    return max(out_channels // 4, 16)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1, 3×3, 1×1) with an identity shortcut. (B, C, H, W) -> same."""

    def __init__(self, channels: int, width: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False),
            norm_layer(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            norm_layer(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1, bias=False),
            norm_layer(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


class UpBottleneck(nn.Module):
    """Bottleneck that doubles the resolution (transposed 2×2 stride 2 in body and shortcut).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, 2H, 2W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            norm_layer(width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, width, 2, stride=2, bias=False),
            norm_layer(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
            norm_layer(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
            norm_layer(out_channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.body(x))


class DecodeStage(nn.Sequential):
    """One de-ResNet stage: an upsampling bottleneck, then ``num_blocks - 1`` plain ones.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, 2H, 2W). ``norm_layer`` builds the
    normalisation from a channel count (BatchNorm, as RD4AD, by default).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        width = bottleneck_width(out_channels)
        super().__init__(
            UpBottleneck(in_channels, out_channels, width, norm_layer),
            *[Bottleneck(out_channels, width, norm_layer) for _ in range(num_blocks - 1)],
        )
