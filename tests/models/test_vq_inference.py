"""The quantiser at inference: the gathered entries themselves, no loss, no second gather; the
training path (loss, straight-through) untouched."""

import pytest
import torch
import torch.nn.functional as F

from engine.models.vq import VectorQuantizer


def _initialised_vq(num_codes: int = 16, dim: int = 8, seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    vq = VectorQuantizer(num_codes=num_codes, dim=dim, beta=0.25)
    vq.initialized.fill_(True)  # keep the N(0, 1) codebook: no data init
    return vq


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("training-only arithmetic at inference")

    for name in names:
        monkeypatch.setattr(F, name, forbidden)


def test_inference_output_is_exactly_the_gathered_entries():
    vq = _initialised_vq().eval()
    z = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        quantized, indices, loss = vq(z, with_loss=False)
    assert loss is None
    rows = quantized.permute(0, 2, 3, 1).reshape(-1, 8)
    # Bit-for-bit: no ``z + (q - z)`` rounding on the way.
    assert torch.equal(rows, vq.codebook.detach()[indices.flatten()])


def test_inference_equals_the_training_output():
    vq = _initialised_vq()
    z = torch.randn(3, 8, 4, 6)
    trained, train_indices, train_loss = vq.train()(z)
    assert train_loss is not None
    with torch.no_grad():
        quantized, indices, _ = vq.eval()(z, with_loss=False)
    assert torch.equal(indices, train_indices)
    assert (quantized - trained).abs().max() <= 1e-6  # straight-through rounding only


def test_inference_computes_no_loss_and_no_second_gather(monkeypatch):
    vq = _initialised_vq().eval()
    z = torch.randn(1, 8, 3, 3)
    _forbid(monkeypatch, "mse_loss", "embedding")
    with torch.no_grad():
        vq(z, with_loss=False)
    with pytest.raises(AssertionError, match="training-only"):
        vq(z)  # validation (eval, loss wanted) still computes it


def test_validation_still_gets_the_loss_under_no_grad():
    vq = _initialised_vq().eval()
    z = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        quantized, _, loss = vq(z)
    squared = ((quantized - z) ** 2).mean()
    assert loss is not None
    assert loss.item() == pytest.approx((1 + 0.25) * squared.item(), rel=1e-5)


def test_gradients_without_the_loss_still_pass_straight_through():
    vq = _initialised_vq().eval()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    quantized, _, loss = vq(z, with_loss=False)
    assert loss is None
    weights = torch.randn_like(quantized)
    (gz,) = torch.autograd.grad((quantized * weights).sum(), z)
    assert torch.allclose(gz, weights)
