"""The logical map path at inference: no VQ loss or straight-through arithmetic, the text
context projected once per frame, and the same maps as the training-time features."""

import pytest
import torch
import torch.nn.functional as F

from engine.models.logical import LogicalConfig, LogicalModel
from kernels import cosine_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> LogicalModel:
    config = LogicalConfig(
        backbone="resnet18",
        codebook_dim=16,
        context_dim=8,
        learned_text_dim=12,
        fusion_width=32,
        decoder_blocks=(1, 1, 1),
        lewin_depth=2,
    )
    torch.manual_seed(0)
    model = LogicalModel.build(config, None, weights="random", allow_random=True, verbose=False)
    return model.eval()


def test_anomaly_map_computes_no_vq_loss(monkeypatch):
    model = _model()
    x = torch.randn(2, 3, 64, 64)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("training-only arithmetic at inference")

    monkeypatch.setattr(F, "mse_loss", forbidden)
    monkeypatch.setattr(F, "embedding", forbidden)
    with torch.no_grad():
        assert model.anomaly_map(x).shape == (2, 64, 64)


def test_anomaly_map_equals_the_map_of_the_training_time_features():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        encoder, decoder, vq_loss = model.features(x)  # with the loss: the straight-through path
        expected = cosine_maps(encoder, decoder, (64, 64), align_corners=True)
        got = model.anomaly_map(x)
    assert vq_loss is not None and torch.isfinite(vq_loss)
    assert (got - expected).abs().max() <= 1e-5


def test_text_context_is_projected_once_per_frame():
    model = _model()
    calls: list[int] = []
    model.decoder.context_fc.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model.anomaly_map(torch.randn(1, 3, 64, 64))
    assert len(calls) == 1
