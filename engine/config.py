"""The build configuration: one typed dataclass composing each module's own config, and presets.

Every module keeps its settings beside its code (``LogicalConfig`` in ``engine.models.logical``,
``StructuralConfig`` in ``engine.models.structural``, ``TrainConfig`` in ``engine.train``,
``FusionConfig`` in ``engine.calibrate``); :class:`BuildConfig` groups them with the choices
that span modules (weights, text prior) and is stored whole in the artifact manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from engine.calibrate import FusionConfig
from engine.models.logical import LogicalConfig, cpu_preset
from engine.models.structural import StructuralConfig
from engine.models.weights import find_torch_home_checkpoint
from engine.train import TrainConfig, cpu_train_preset

PRESETS = ("auto", "paper", "cpu")


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs besides the data.

    ``weights``: backbone weights for both branches, ``"auto"`` (torchvision cache, else the
    offline EfficientNet-Lite0 substitute, announced), ``"imagenet"`` (fail rather than
    substitute) or ``"random"`` (needs ``allow_random``; tests and timing only).
    ``text_prior``: ``auto`` | ``clip`` | ``minilm`` | ``learned`` (see
    :func:`engine.models.text_prior.resolve_text_prior`).
    """

    preset: str = "paper"
    logical: LogicalConfig = field(default_factory=LogicalConfig)
    structural: StructuralConfig = field(default_factory=StructuralConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    weights: str = "auto"
    allow_random: bool = False
    text_prior: str = "auto"
    clip_checkpoint: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BuildConfig:
        """Inverse of :meth:`to_dict` (a manifest's ``config``); unknown keys are an error."""
        parts = {
            "logical": LogicalConfig,
            "structural": StructuralConfig,
            "train": TrainConfig,
            "fusion": FusionConfig,
        }
        kwargs = dict(values)
        for name, kind in parts.items():
            if name in kwargs:
                kwargs[name] = _dataclass_from_dict(kind, kwargs[name])
        return _dataclass_from_dict(cls, kwargs)


def _dataclass_from_dict(kind: type, values: dict):
    known = {f.name for f in fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
    # JSON has no tuples: every list-valued field of these configs is a tuple.
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def paper_preset() -> BuildConfig:
    """The paper's settings: ResNet-101 logical encoder, ResNeXt-101 memory bank, 50 epochs."""
    return BuildConfig(preset="paper")


def cpu_build_preset() -> BuildConfig:
    """Settings that build one small category in minutes on 2 CPU cores.

    Both branches use EfficientNet-Lite0 (real offline ImageNet weights): the logical module at
    128 px with a narrow decoder and 16 epochs, the memory bank at the paper's 256 px and 1024-d
    patches. On synthetic pushpins (2 cores) this beat 128 px / 256-d / 8 epochs by +0.10 fused
    mean image AUROC (0.69 vs 0.59) for about 2.5 min instead of 1 (docs/PERFORMANCE.md).
    """
    structural = replace(StructuralConfig(), backbone="efficientnet_lite0")
    train = replace(cpu_train_preset(), epochs=16)
    return BuildConfig(preset="cpu", logical=cpu_preset(), structural=structural, train=train)


def missing_paper_weights() -> list[str]:
    """Architectures of the paper whose ImageNet weights are missing from ``$TORCH_HOME``."""
    return [
        arch
        for arch in (LogicalConfig().backbone, StructuralConfig().backbone)
        if find_torch_home_checkpoint(arch) is None
    ]


def resolve_preset(name: str, device: torch.device) -> tuple[BuildConfig, str]:
    """The config for preset ``name`` and a sentence saying why (printed by the build).

    ``auto`` picks ``paper`` on a CUDA device when the paper's ImageNet weights are in the
    torchvision cache, else ``cpu``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    if name == "paper":
        return paper_preset(), "preset 'paper' (asked for)"
    if name == "cpu":
        return cpu_build_preset(), "preset 'cpu' (asked for)"
    missing = missing_paper_weights()
    if device.type == "cuda" and not missing:
        return paper_preset(), "preset 'paper': CUDA device and the paper's weights are present"
    reasons = []
    if device.type != "cuda":
        reasons.append("no CUDA device")
    if missing:
        home = Path(torch.hub.get_dir()) / "checkpoints"
        reasons.append(f"no ImageNet weights for {', '.join(missing)} in {home}")
    return cpu_build_preset(), f"preset 'cpu': {'; '.join(reasons)}"
