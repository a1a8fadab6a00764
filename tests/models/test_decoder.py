import pytest
import torch

from engine.models.decoder import Bottleneck, DecodeStage, UpBottleneck, bottleneck_width


@pytest.mark.parametrize(
    ("in_ch", "out_ch", "blocks"), [(64, 256, 3), (320, 112, 1), (40, 24, 2), (7, 5, 1)]
)
def test_stage_doubles_resolution_and_matches_the_encoder_width(in_ch, out_ch, blocks):
    stage = DecodeStage(in_ch, out_ch, blocks)
    assert len(stage) == blocks
    out = stage(torch.randn(2, in_ch, 3, 5))
    assert out.shape == (2, out_ch, 6, 10)
    assert (out >= 0).all()  # ends in ReLU, like a ResNet stage


def test_up_bottleneck_uses_transposed_convolutions_in_both_paths():
    block = UpBottleneck(8, 16, width=4)
    transposed = [m for m in block.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(transposed) == 2
    assert all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in transposed)


def test_bottleneck_is_residual():
    block = Bottleneck(16, 4)
    for module in block.body.modules():  # zero body: output = relu(input)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
    x = torch.randn(1, 16, 4, 4)
    assert torch.allclose(block(x), torch.relu(x))


def test_gradients_reach_every_parameter():
    stage = DecodeStage(12, 24, 2)
    stage(torch.randn(2, 12, 4, 4)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())


def test_bottleneck_width_follows_expansion_with_a_floor():
    assert bottleneck_width(1024) == 256
    assert bottleneck_width(24) == 16


def test_rejects_zero_blocks():
    with pytest.raises(ValueError, match="num_blocks"):
        DecodeStage(8, 8, 0)


def test_group_norm_stage_trains_on_a_single_1x1_map():
    def group_norm(channels: int) -> torch.nn.Module:
        return torch.nn.GroupNorm(1, channels)

    stage = DecodeStage(8, 16, 2, norm_layer=group_norm).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stage.modules())
    assert stage(torch.randn(1, 8, 1, 1)).shape == (1, 16, 2, 2)
    with pytest.raises(ValueError):  # the BatchNorm default cannot, hence the option
        DecodeStage(8, 16).train()(torch.randn(1, 8, 1, 1))
