"""BatchNorm folding (engine.models.folding): same outputs, no BatchNorm left in the pass."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from engine.models.backbones import load_backbone
from engine.models.folding import fold_batchnorm


def _randomise_batchnorms(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from identity, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                size = bn.num_features
                bn.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                bn.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(size, generator=generator) * 0.1)


def _batchnorms_called(module: nn.Module, run) -> int:
    calls = []
    hooks = [
        bn.register_forward_hook(lambda *_: calls.append(1))
        for bn in module.modules()
        if isinstance(bn, nn.BatchNorm2d)
    ]
    run()
    for hook in hooks:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_folded_backbone_gives_the_same_features_without_batchnorm(arch: str) -> None:
    # Seeded, so that a failure reproduces.
    torch.manual_seed(0)
    backbone = load_backbone(
        arch, ["layer1", "layer2", "layer3"], "random", allow_random=True, verbose=False
    )
    _randomise_batchnorms(backbone)
    probe = torch.randn(1, 3, 64, 64)
    image = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        before = backbone(image)
    assert _batchnorms_called(backbone, lambda: backbone(probe)) > 0

    folded = fold_batchnorm(backbone, lambda: backbone(probe))

    assert folded > 0
    assert _batchnorms_called(backbone, lambda: backbone(probe)) == 0
    with torch.no_grad():
        after = backbone(image)
    for level, features in before.items():
        # float32 rounding of the folded weights grows with the features' scale and the depth:
        # up to 2e-6 of the largest value measured (ResNet-18 layer3: 6e-5 on values up to 29,
        # machine-dependent); a wrong fold is off by the order of the values themselves.
        scale = float(features.abs().max())
        torch.testing.assert_close(after[level], features, rtol=1e-4, atol=1e-5 * scale)


class _SharedConvOutput(nn.Module):
    """conv -> bn, with the conv output also added back: folding the pair would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_fold_that_changes_the_output_is_undone(caplog: pytest.LogCaptureFixture) -> None:
    model = _SharedConvOutput().eval()
    _randomise_batchnorms(model)
    probe = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = model(probe)

    with caplog.at_level(logging.WARNING, logger="engine.models.folding"):
        assert fold_batchnorm(model, lambda: model(probe)) == 0

    assert isinstance(model.bn, nn.BatchNorm2d)
    assert "left unfolded" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(probe), before, rtol=0, atol=0)


def test_folding_refuses_a_training_mode_module() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model, lambda: model(torch.zeros(1, 3, 4, 4)))
