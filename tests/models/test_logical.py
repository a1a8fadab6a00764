import pytest
import torch

from engine.models.backbones import load_backbone
from engine.models.logical import LogicalConfig, LogicalModel, cpu_preset, logical_loss
from kernels import cosine_maps

SMALL = {"codebook_dim": 16, "context_dim": 8, "learned_text_dim": 12, "fusion_width": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(backbone: str = "resnet18", text: torch.Tensor | None = None, **overrides):
    values = {**SMALL, "backbone": backbone, "decoder_blocks": (1, 1, 1), **overrides}
    config = LogicalConfig(**values)
    torch.manual_seed(0)
    return LogicalModel.build(config, text, weights="random", allow_random=True, verbose=False)


def _check_shapes(model: LogicalModel, x: torch.Tensor) -> None:
    out = model(x)
    encoder = model.encoder(x)
    assert len(out.encoder) == len(out.decoder) == 3
    for level, e, d in zip(model.levels, out.encoder, out.decoder, strict=True):
        assert d.shape == e.shape == encoder[level].shape
        assert d.shape[1] == model.encoder.channels[level]
    assert out.image.shape == x.shape
    assert out.vq_loss.dim() == 0 and torch.isfinite(out.vq_loss)
    assert model.anomaly_map(x).shape == (x.shape[0], x.shape[2], x.shape[3])


@pytest.mark.parametrize(("backbone", "size"), [("resnet18", 64), ("efficientnet_lite0", 64)])
def test_output_shapes_per_backbone(backbone, size):
    _check_shapes(_model(backbone), torch.randn(2, 3, size, size))


def test_paper_default_sizes_at_256_px():
    _check_shapes(_model("resnet18"), torch.randn(1, 3, 256, 256))


def test_output_shapes_resnet101_at_64px():
    model = _model("resnet101")
    assert model.encoder.channels["layer3"] == 1024  # widths follow the backbone
    _check_shapes(model, torch.randn(1, 3, 64, 64))


def test_non_square_input():
    _check_shapes(_model("resnet18"), torch.randn(1, 3, 64, 96))


def test_anomaly_map_is_the_cosine_map_of_the_features():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = model.anomaly_map(x)
        out = model(x)
    # Independent per-level computation: 1 - cos over channels, bilinear align_corners=True.
    expected = torch.zeros(2, 64, 64)
    for e, d in zip(out.encoder, out.decoder, strict=True):
        level = 1 - torch.nn.functional.cosine_similarity(e, d, dim=1)
        expected += torch.nn.functional.interpolate(
            level[:, None], size=(64, 64), mode="bilinear", align_corners=True
        )[:, 0]
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(got, cosine_maps(out.encoder, out.decoder, (64, 64)), atol=1e-5)


def test_encoder_is_frozen_and_stays_in_eval_mode():
    model = _model().train()
    assert not model.encoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in model.decoder.parameters()) for p in trainable)
    running = [b.clone() for b in model.encoder.buffers()]
    model(torch.randn(2, 3, 64, 64) * 3)
    assert all(torch.equal(a, b) for a, b in zip(running, model.encoder.buffers(), strict=True))


def test_text_embedding_is_a_fixed_buffer_and_none_is_learned():
    text = torch.randn(20)
    fixed = _model(text=text)
    assert torch.equal(fixed.decoder.text, text)
    assert not isinstance(fixed.decoder.text, torch.nn.Parameter)
    assert fixed.decoder.context_fc.in_features == 20
    learned = _model()
    assert isinstance(learned.decoder.text, torch.nn.Parameter)
    assert learned.decoder.text.numel() == SMALL["learned_text_dim"]


def test_context_changes_the_output():
    x = torch.randn(1, 3, 64, 64)
    a = _model(text=torch.ones(8)).eval()
    b = _model(text=-torch.ones(8)).eval()
    b.decoder.load_state_dict({**a.decoder.state_dict(), "text": -torch.ones(8)})
    with torch.no_grad():
        assert not torch.allclose(a.anomaly_map(x), b.anomaly_map(x))


def test_loss_decreases_on_a_fixed_batch():
    model = _model().train()
    x = torch.randn(2, 3, 64, 64)
    optimiser = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=2e-3, betas=(0.5, 0.999)
    )
    losses = []
    for _ in range(15):
        loss = logical_loss(model(x), x, model.config).total
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_loss_terms_and_weights():
    model = _model(image_weight=0.0, vq_weight=2.0).train()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    terms = logical_loss(out, x, model.config)
    assert terms.image > 0 and terms.feature > 0
    assert terms.total.item() == pytest.approx(terms.feature.item() + 2 * terms.vq.item(), 1e-5)
    expected_image = ((out.image - x) ** 2).mean()
    assert terms.image.item() == pytest.approx(expected_image.item(), rel=1e-5)


def test_pixel_and_flat_feature_losses_differ_as_documented():
    e = torch.ones(1, 2, 1, 2)
    e[0, :, 0, 1] = torch.tensor([100.0, 0.0])  # one high-norm pixel
    d = e.clone()
    d[0, :, 0, 0] = torch.tensor([-1.0, -1.0])  # the low-norm pixel is reversed
    config = LogicalConfig(**SMALL)
    out = type("Out", (), {})()
    out.encoder, out.decoder = [e], [d]
    out.image, out.vq_loss = torch.zeros(1, 3, 2, 2), torch.zeros(())
    pixel = logical_loss(out, torch.zeros(1, 3, 2, 2), config).feature.item()
    flat_config = LogicalConfig(**SMALL, feature_loss="flat")
    flat = logical_loss(out, torch.zeros(1, 3, 2, 2), flat_config).feature.item()
    assert pixel == pytest.approx(1.0)  # (2 + 0) / 2
    assert flat < 0.01  # dominated by the high-norm pixel, which matches


def test_anomaly_map_traces_without_data_dependent_branches():
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(_MapOnly(model), x, check_trace=False)
        y = torch.randn(1, 3, 64, 64)
        assert torch.allclose(traced(y), model.anomaly_map(y), atol=1e-5)


class _MapOnly(torch.nn.Module):
    def __init__(self, model: LogicalModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.anomaly_map(x)


@pytest.mark.parametrize(
    ("bottleneck_input", "strides", "grid"), [("last", (2, 2), 1), ("fused", (1, 1), 4)]
)
def test_bottleneck_input_and_oce_strides_set_the_bottleneck(bottleneck_input, strides, grid):
    model = _model(
        "efficientnet_lite0", bottleneck_input=bottleneck_input, oce_strides=strides
    ).eval()
    seen = {}
    model.decoder.oce.register_forward_hook(lambda m, i, o: seen.update(oce=o.shape))
    x = torch.randn(2, 3, 128, 128)  # layer4 is 4×4
    _check_shapes(model, x)
    assert seen["oce"][-2:] == (grid, grid)
    assert (model.decoder.fuse_levels is None) == (bottleneck_input == "last")


def test_fused_bottleneck_sees_every_compared_level():
    model = _model(bottleneck_input="fused", oce_strides=(1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    features = model.encoder(x)
    fused = model.decoder.fuse_levels(features)
    for level in model.levels:  # change one finer level only: the bottleneck input changes
        changed = dict(features, **{level: features[level] + 1.0})
        assert not torch.allclose(model.decoder.fuse_levels(changed), fused)


def test_codebooks_are_initialised_by_kmeans_on_training_batches():
    model = _model()
    images = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    model.init_codebooks(images, seed=0)
    codebooks = {lv: q.codebook.detach().clone() for lv, q in model.decoder.quantizers().items()}
    assert all(bool(q.initialized) for q in model.decoder.quantizers().values())
    again = _model()
    again.init_codebooks(images, seed=0)
    for level, quantizer in again.decoder.quantizers().items():
        assert torch.equal(quantizer.codebook, codebooks[level])
    model.eval()
    _, indices, _ = model.decoder.stages["layer1"].vq(
        model.decoder.stages["layer1"].atrous(model.encoder(images[0])["layer2"])
    )
    assert indices.unique().numel() > 1  # not one entry for everything


def test_cpu_preset_builds_and_runs():
    config = cpu_preset()
    assert config.backbone == "efficientnet_lite0"
    encoder = load_backbone(
        config.backbone,
        (*config.compared_levels, config.bottleneck_level),
        "random",
        allow_random=True,
        verbose=False,
    )
    model = LogicalModel(config, encoder)
    size = config.image_size
    assert model.anomaly_map(torch.randn(1, 3, size, size)).shape == (1, size, size)


@pytest.mark.parametrize(
    "overrides",
    [
        {"compared_levels": ()},
        {"compared_levels": ("layer1", "layer4"), "decoder_blocks": (1, 1)},
        {"decoder_blocks": (1, 1)},
        {"feature_loss": "l2"},
        {"codebook_size": 0},
        {"fusion_width": 0},
        {"image_weight": -1.0},
        {"vq_weight": float("nan")},
        {"decoder_blocks": (1, 0, 1)},
        {"bottleneck_input": "all"},
        {"oce_strides": (2, 3)},
        {"oce_strides": (2,)},
        {"codebook_init": "random"},
    ],
)
def test_bad_config_is_rejected(overrides):
    with pytest.raises(ValueError):
        LogicalConfig(**overrides)


def test_config_round_trips_through_a_dict():
    config = LogicalConfig(**SMALL)
    as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    assert LogicalConfig.from_dict(as_lists) == config
    with pytest.raises(ValueError, match="unknown"):
        LogicalConfig.from_dict({**as_lists, "window": 4})


def test_non_consecutive_levels_are_rejected():
    with pytest.raises(ValueError, match="consecutive"):
        _model(compared_levels=("layer1", "layer3"), decoder_blocks=(1, 1))


def test_bad_text_embedding_and_input_are_rejected():
    with pytest.raises(ValueError, match="text_embedding"):
        _model(text=torch.randn(2, 4))
    with pytest.raises(ValueError, match="text_embedding"):
        _model(text=torch.tensor([1.0, float("nan")]))
    model = _model()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.anomaly_map(torch.randn(1, 1, 64, 64))


def test_codebooks_need_as_many_training_vectors_as_entries():
    model = _model()
    with pytest.raises(ValueError, match="codebook has 16 entries, but the training images give"):
        model.init_codebooks([torch.randn(2, 3, 32, 32)], seed=0)
