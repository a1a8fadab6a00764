import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from engine import pipeline
from engine.models.logical import LogicalConfig, LogicalModel
from engine.models.logical_diagnostics import (
    COLLAPSE_RATIO,
    code_perplexity,
    code_usage,
    collapse_warning,
    collapsed_levels,
    fixed_share,
    format_diagnostics,
    logical_diagnostics,
    probe_batch,
    relative_std,
)
from engine.train import TrainResult

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LogicalModel:
    config = LogicalConfig(
        backbone="resnet18",
        image_size=SIZE,
        codebook_dim=16,
        context_dim=8,
        learned_text_dim=12,
        fusion_width=32,
        lewin_depth=1,
        decoder_blocks=(1, 1, 1),
    )
    torch.manual_seed(0)
    return LogicalModel.build(config, weights="random", allow_random=True, verbose=False)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@contextmanager
def _hooked(module: torch.nn.Module, hook) -> Iterator[None]:
    """``hook`` as a forward hook on ``module`` for the ``with`` block."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _reconstruct_encoder(constant: str | None = None):
    """A decoder forward hook that outputs the encoder features themselves (a perfect, healthy
    reconstruction), or a constant map at level ``constant`` (a collapsed one)."""

    def hook(module, args, output):
        features, (decoded, vq_loss) = args[0], output
        fake = {lv: features[lv].clone() for lv in decoded}
        if constant is not None:
            fake[constant] = torch.full_like(decoded[constant], 0.7)
        return fake, vq_loss

    return hook


# ---- pure statistics on hand-made tensors


def test_code_usage_and_perplexity():
    one_code = torch.zeros(3, 4, 4, dtype=torch.long)
    assert code_usage(one_code) == 1 and code_perplexity(one_code, 16) == pytest.approx(1.0)
    uniform = torch.arange(8).reshape(2, 2, 2)
    assert code_usage(uniform) == 8 and code_perplexity(uniform, 16) == pytest.approx(8.0)
    # Histogram (2, 1, 1) of 4 positions: entropy 1.5 ln 2, perplexity 2 ** 1.5.
    skewed = torch.tensor([[[0, 0], [1, 2]]])
    assert code_usage(skewed) == 3
    assert code_perplexity(skewed, 4) == pytest.approx(2**1.5)


def test_fixed_share_counts_positions_with_one_code_in_every_image():
    indices = torch.tensor(
        [
            [[3, 1], [0, 2]],
            [[3, 1], [1, 2]],
            [[3, 0], [2, 2]],
        ]
    )  # (B=3, H=2, W=2): positions (0,0) and (1,1) never change
    assert fixed_share(indices) == pytest.approx(0.5)
    assert fixed_share(torch.zeros(2, 3, 3, dtype=torch.long)) == 1.0
    with pytest.raises(ValueError, match="at least 2 images"):
        fixed_share(indices[:1])


def test_relative_std_definition():
    ones = torch.ones(2, 4, 3, 3)
    assert relative_std(ones) == 0.0  # every image the same
    assert relative_std(torch.zeros(3, 2, 2, 2)) == 0.0
    # Images all 1 and all 3: across-image variance 1, mean square 5.
    batch = torch.stack([ones[0], 3 * ones[0]])
    assert relative_std(batch) == pytest.approx(math.sqrt(1 / 5))
    assert relative_std(torch.stack([ones[0], -ones[0]])) == pytest.approx(1.0)  # the maximum
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    assert relative_std(10 * x) == pytest.approx(relative_std(x))  # scale-free
    with pytest.raises(ValueError, match="at least 2 images"):
        relative_std(x[:1])


def test_collapsed_levels_compares_decoder_with_encoder():
    # The pushpins artifact of issue 11: layer2/layer3 collapsed, layer1 live.
    encoder = {"layer1": 0.63, "layer2": 0.54, "layer3": 0.44}
    decoder = {"layer1": 0.35, "layer2": 0.0, "layer3": 0.0}
    assert collapsed_levels(encoder, decoder) == ["layer2", "layer3"]
    # The held-out LOCO layer1 (0.05 vs 0.45): a template in all but name.
    assert collapsed_levels({"layer1": 0.45}, {"layer1": 0.05}) == ["layer1"]
    # An encoder that does not vary cannot be judged.
    assert collapsed_levels({"layer1": 0.0}, {"layer1": 0.0}) == []
    assert COLLAPSE_RATIO == 0.2


# ---- the model through hooks


def test_a_decoder_that_reproduces_the_encoder_is_not_collapsed(model, probe):
    with _hooked(model.decoder, _reconstruct_encoder()):
        result = logical_diagnostics(model, probe)
    assert result["collapsed_levels"] == []
    for stats in result["levels"].values():
        assert stats["decoder_relative_std"] == stats["encoder_relative_std"] > 0.1


def test_a_constant_level_is_reported_collapsed(model, probe):
    with _hooked(model.decoder, _reconstruct_encoder(constant="layer2")):
        result = logical_diagnostics(model, probe)
    assert result["collapsed_levels"] == ["layer2"]
    assert result["levels"]["layer2"]["decoder_relative_std"] == 0.0
    assert "collapsed: layer2" in format_diagnostics(result)


def test_a_constant_decoding_stage_is_reported_collapsed(model, probe):
    def constant_output(module, args, output):
        decoded, vq_loss = output
        return torch.zeros_like(decoded), vq_loss

    with _hooked(model.decoder.stages["layer3"], constant_output):
        result = logical_diagnostics(model, probe)
    assert "layer3" in result["collapsed_levels"]
    assert result["levels"]["layer3"]["decoder_relative_std"] == 0.0


def test_codebook_statistics_come_from_the_quantiser_indices(model, probe):
    def by_position(module, args, output):
        quantized, indices, loss = output
        b, h, w = indices.shape
        positional = (torch.arange(h * w) % 3).reshape(1, h, w).expand(b, h, w)
        return quantized, positional.clone(), loss

    with _hooked(model.decoder.stages["layer2"].vq, by_position):
        result = logical_diagnostics(model, probe)
    assert list(result["codebooks"]) == list(model.levels)  # fine to coarse, like the levels
    layer2 = result["codebooks"]["layer2"]
    assert layer2["fixed_share"] == 1.0  # the code depends on the position only
    assert (
        layer2["usage"] == 3 and layer2["num_codes"] == model.decoder.stages["layer2"].vq.num_codes
    )
    assert 0 < result["oce_relative_std"] <= 1


def test_diagnostics_are_json_ready_and_leave_the_model_as_it_was(model, probe):
    model.train()
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    result = logical_diagnostics(model, probe)
    assert model.training and not model.encoder.training
    after = model.decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no codebook init, no BN update
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert set(result["levels"]) == set(model.levels)
    model.eval()


# ---- what the build uses


def test_probe_takes_up_to_16_validation_images_else_completes_to_two():
    images = torch.arange(20, dtype=torch.float32)[:, None, None, None].expand(20, 3, 2, 2)
    many, train = TensorDataset(images, torch.arange(20)), TensorDataset(-images[:5])
    probe = probe_batch(many, train)
    assert probe.shape == (16, 3, 2, 2) and torch.equal(probe, images[:16])
    one = TensorDataset(images[:1])
    assert torch.equal(probe_batch(one, train), torch.stack([images[0], -images[0]]))
    with pytest.raises(ValueError, match="at least 2 images"):
        probe_batch(one, TensorDataset(images[:0]))


def test_collapse_warning_says_what_collapse_means():
    assert collapse_warning({"collapsed_levels": []}) is None
    warning = collapse_warning({"collapsed_levels": ["layer2", "layer3"]})
    assert warning.startswith("WARNING:")
    assert "layer2, layer3" in warning and "template" in warning
    assert "docs/ACCURACY.md" in warning


def test_build_logs_a_warning_when_the_kept_epoch_collapsed(caplog, model, probe):
    def result(collapsed: list[str]) -> TrainResult:
        history = [
            {"epoch": 1, "collapsed_levels": collapsed},
            {"epoch": 2, "collapsed_levels": []},
        ]
        return TrainResult([1.0, 0.9], [1.0, 1.1], best_epoch=1, seconds=1.0, diagnostics=history)

    with caplog.at_level(logging.WARNING, logger="engine.pipeline"):
        pipeline._warn_if_collapsed(result(["layer3"]), model, probe)
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith("the logical decoder has collapsed at layer3")
    caplog.clear()
    pipeline._warn_if_collapsed(result([]), model, probe)
    assert caplog.records == []


@pytest.mark.slow
def test_build_records_diagnostics_per_epoch_in_the_manifest(tiny_build: dict[str, Path]):
    from engine.artifact import read_manifest

    training = read_manifest(tiny_build["artifact"])["training"]
    history = training["diagnostics"]
    assert [entry["epoch"] for entry in history] == list(
        range(1, len(training["train_losses"]) + 1)
    )
    levels = set(history[-1]["levels"])
    assert levels == {"layer1", "layer2", "layer3"}
    assert set(history[-1]["codebooks"]) == levels
    assert training["collapse_ratio"] == COLLAPSE_RATIO
