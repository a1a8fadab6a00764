"""The build configuration: one typed dataclass composing each module's own config, and presets.

Every module keeps its settings beside its code (``LogicalConfig`` in ``engine.models.logical``,
``StructuralConfig`` in ``engine.models.structural``, ``TrainConfig`` in ``engine.train``,
``FusionConfig`` in ``engine.calibrate``, ``CompositionConfig`` in
``engine.models.composition``, ``PositionalConfig`` in ``engine.models.positional``);
:class:`BuildConfig` groups them with the choices
that span modules (weights, text prior) and is stored whole in the artifact manifest.
"""

from __future__ import annotations

import json
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch

from engine.calibrate import FusionConfig
from engine.models.composition import CompositionConfig
from engine.models.logical_config import LogicalConfig, cpu_preset
from engine.models.positional import PositionalConfig
from engine.models.structural import StructuralConfig
from engine.models.weights import find_torch_home_checkpoint
from engine.train_config import TrainConfig, cpu_train_preset

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
    composition: CompositionConfig = field(default_factory=CompositionConfig)
    positional: PositionalConfig = field(default_factory=PositionalConfig)
    weights: str = "auto"
    allow_random: bool = False
    text_prior: str = "auto"
    clip_checkpoint: str | None = None

    def __post_init__(self) -> None:
        # The section configs check their values' ranges; the declared types are checked here,
        # for every section, so no str can sit in a bool field (from a manifest or from code).
        check_field_types(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BuildConfig:
        """Inverse of :meth:`to_dict` (a manifest's ``config``).

        Raises:
            ValueError: unknown keys, or a value that is not of its field's declared type
                (named as ``section.field``).
        """
        return _dataclass_from_dict(cls, values, "")


def _dataclass_from_dict(kind: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or 'config'}: expected a JSON object, got {values!r}")
    unknown = set(values) - {f.name for f in fields(kind)}
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, declared in field_types(kind).items():
        if name not in values:
            continue
        where = prefix + name
        if is_dataclass(declared):
            kwargs[name] = _dataclass_from_dict(declared, values[name], where + ".")
        else:
            kwargs[name] = convert_value(declared, values[name], where)
    return kind(**kwargs)


# ---- declared field types: checking JSON-like values and parsing command-line text ----------

_TRUE_WORDS = frozenset({"true", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})
_NONE_WORDS = frozenset({"null", "none"})


def field_types(kind: type) -> dict[str, Any]:
    """The declared type of each field of the dataclass ``kind`` (annotations resolved)."""
    hints = get_type_hints(kind)
    return {f.name: hints[f.name] for f in fields(kind)}


def _optional(declared: Any) -> tuple[bool, Any]:
    """(whether ``None`` is allowed, the type without ``None``)."""
    if get_origin(declared) in (Union, types.UnionType):
        args = get_args(declared)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return True, rest[0]
    return False, declared


def describe_type(declared: Any) -> str:
    """Words for a declared type, as error messages show it."""
    optional, inner = _optional(declared)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if inner in words:
        text = words[inner]
    elif get_origin(inner) is tuple:
        args = get_args(inner)
        if len(args) == 2 and args[1] is Ellipsis:
            text = f"a comma-separated list of {describe_type(args[0])} values"
        else:
            text = f"{len(args)} comma-separated values ({', '.join(map(describe_type, args))})"
    else:
        text = getattr(inner, "__name__", str(inner))
    return f"{text} or null" if optional else text


def convert_value(declared: Any, value: Any, where: str) -> Any:
    """``value`` (JSON-like: bool, int, float, str, None, list) as the type ``declared``.

    Strict: a bool is not an int, a number is not a bool, an int field refuses 2.5; ints are
    accepted for float fields (as floats) and lists for tuple fields (as tuples).

    Raises:
        ValueError: naming ``where`` (the field) and the expected type.
    """
    optional, inner = _optional(declared)
    if value is None and optional:
        return None
    if inner is bool and type(value) is bool:
        return value
    if inner is int and type(value) is int:
        return value
    if inner is float and type(value) in (int, float):
        return float(value)
    if inner is str and isinstance(value, str):
        return value
    if get_origin(inner) is tuple and isinstance(value, list | tuple):
        args = get_args(inner)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) == len(value):
            return tuple(
                convert_value(arg, item, f"{where}[{i}]")
                for i, (arg, item) in enumerate(zip(args, value, strict=True))
            )
    raise ValueError(f"{where} expects {describe_type(declared)}, got {value!r}")


def parse_value(declared: Any, text: str, where: str) -> Any:
    """Command-line ``text`` as the type ``declared`` (see :func:`convert_value`).

    Booleans: ``true/false/yes/no/1/0`` (any case). Optional fields: ``null`` or ``none``.
    Tuples: a JSON list or comma-separated items (``0.5,0.999``). Strings: the text itself (a
    JSON string literal is unquoted). Numbers: JSON numbers.
    """
    optional, inner = _optional(declared)
    stripped = text.strip()
    if optional and stripped.lower() in _NONE_WORDS:
        return None
    if inner is str:
        return _json_or_text(text)
    if inner is bool:
        word = stripped.lower()
        if word in _TRUE_WORDS | _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise ValueError(f"{where} expects {describe_type(declared)}, got {text!r}")
    if get_origin(inner) is tuple and not stripped.startswith("["):
        args = get_args(inner)
        items = stripped.split(",") if stripped else []
        item_types = (args[0],) * len(items) if args[-1] is Ellipsis else args
        if len(item_types) != len(items):
            raise ValueError(f"{where} expects {describe_type(declared)}, got {text!r}")
        return tuple(
            parse_value(kind, item, f"{where}[{i}]")
            for i, (kind, item) in enumerate(zip(item_types, items, strict=True))
        )
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        raise ValueError(f"{where} expects {describe_type(declared)}, got {text!r}") from None
    return convert_value(declared, value, where)


def _json_or_text(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def check_field_types(obj: Any, prefix: str = "") -> None:
    """Raise ValueError unless every field of the dataclass ``obj`` (sections included,
    recursively) holds a value of its declared type."""
    for name, declared in field_types(type(obj)).items():
        value = getattr(obj, name)
        where = prefix + name
        if is_dataclass(declared):
            if type(value) is not declared:
                raise ValueError(f"{where} must be a {declared.__name__}, got {value!r}")
            check_field_types(value, where + ".")
        else:
            convert_value(declared, value, where)


def paper_preset() -> BuildConfig:
    """The paper's settings: ResNet-101 logical encoder, ResNeXt-101 memory bank, 50 epochs."""
    return BuildConfig(preset="paper")


def cpu_build_preset() -> BuildConfig:
    """Settings that build one small category in minutes on 2 CPU cores.

    EfficientNet-Lite0 (real offline ImageNet weights) in every branch: the logical module at
    128 px with a narrow decoder, a fused bottleneck input and 720 training steps; the memory bank at
    384 px (the paper: 256) and 1024-d patches; the composition branch on the memory bank's
    features. 320 px raised the fused mean image AUROC over 256 px by 0.016-0.019 in each of 3
    seeds of the accuracy benchmark, and 384 px over 320 px again in each of 3 seeds
    (docs/ACCURACY.md, ablation 5), at about 1.3x the build time.
    Fusion weights start from equal (all 1), the neutral choice after each map is normalised:
    the paper's structural:logical = 1:3 leaves the fused map below the structural branch alone
    at this preset (docs/ACCURACY.md), since the small logical module is the weakest branch here.
    The logical weight is 0.5 (it scales only the logical evidence above its typical good-image
    peak): paired over 20 builds of seeds 20 and 22-24, fused AU-sPRO@0.05 +0.0016 (standard
    error 0.0005) and mean image AUROC +0.0029 (0.0010), the rule fixed before seed 24 was built
    (docs/ACCURACY.md, ablations 53, 54).
    The maps merge by their maximum in validation image-score units, the logical and structural
    std pooled (``merge="max"``, ``image_scale="pooled"``): against the paper's sum, +0.010 mean
    image AUROC and +0.010 AU-sPRO, paired over 3 seeds it was not chosen on (ablation 3).
    The composition branch's image scores are scaled by their median and MAD, not their mean
    and std (``composition_scale="robust"``): two rare but normal layouts among 60 validation
    images inflated the std tenfold on a LOCO-size breakfast_box and hid its count anomalies
    (fused mean 0.868 -> 0.950); the synthetic benchmark is unchanged (ablation 6).
    The positional memory is on: fused AU-sPRO@0.05 +0.014 (+0.013 / +0.015 / +0.014 paired over
    3 seeds, logical subset +0.031), image AUROC -0.001 (ablation 13). It keeps 64 principal
    directions, not 128: half the memory and search time (a LOCO-size frame 151 -> 137 ms in
    eager), fused image AUROC and AU-sPRO within 0.001 paired over 3 seeds (ablation 17). It
    shapes the fused map but does not raise the image score (``positional_role="shape"``):
    fused mean image AUROC +0.008 / +0.006 on seeds 9-10 / 11-12 (new data, the rule fixed
    before they were built), AU-sPRO@0.05 within 0.002 (ablation 32). So its weight, which
    scales only its evidence above its typical peak, is 2: AU-sPRO@0.05 +0.005 / +0.003 / +0.003
    / +0.003 / +0.004 paired on seeds 13-17 (14-17 new data, the rule fixed first), image AUROC
    unchanged (ablations 33, 34, 36; while it still raised the score, 0.5 traded AU-sPRO for
    image AUROC, ablation 30).
    The memory bank also reads the stride-4 level, max-pooled onto the layer2 grid, while the
    composition branch reads the features without it: fused mean image AUROC +0.014 / +0.017
    and AU-sPRO +0.009 / +0.016 paired on seeds 3 / 4, every category up on seed 3 (ablation 21).
    The memory bank's coreset also chooses from the training images turned by -3 and +3 degrees,
    at the same bank size: fused mean image AUROC +0.008 / +0.007 paired on seeds 3 / 4 (the
    test) and +0.004 / +0.005 on seeds 5 / 6 (its confirmation), AU-sPRO +0.002, 15-30 s more
    per build (ablation 25).
    Each memory-bank distance is measured in units of the bank's local spacing around the nearest
    row (``density_k=3``: that row's distance to its 3rd nearest other row): fused mean image
    AUROC +0.009 / +0.008 and AU-sPRO@0.05 +0.004 / +0.009 paired on seeds 16 / 17 (the rule
    fixed first; pushpins +0.028, while the bank alone localises worse on screw_bag), about a
    second more per synthetic build (ablation 37).
    The composition branch is three k-means fits (``composition.members=3``), its image score
    the mean of their standardised distances: fused mean image AUROC +0.012 / +0.007 (logical
    subset +0.019 / +0.013) and AU-sPRO@0.05 +0.001 / +0.000 paired on seeds 18 / 19, the rule
    fixed first (ablation 44; five fits had gained only +0.003 over seeds 2-6, ablation 23),
    at 11-16 ms more per CPU frame (docs/PERFORMANCE.md). Combining fine parts or windows needs
    ``composition.members=1``.
    A composition descriptor dimension that never varied on the training images is scaled by
    its component's patch spread (``composition.unseen_scale=1``, the branch's default since
    ablation 45): fused mean image AUROC +0.006 over five seeds at image level, no seed lower.
    The composition evidence is also placed where the model's components carry its distance
    (``fusion.placement_power=16``): fused AU-sPRO@0.05 0.680 -> 0.696 paired over seeds 20-22
    (+0.016 ± 0.005 standard error over 15 builds; the logical subset +0.035), image AUROC
    unchanged, juice_bottle -0.009 (power 4: -0.023, power 8: -0.013), the rule fixed before
    seeds 20 and 22 were measured (ablations 47-50).
    The composition model also maps where a part is missing (``composition.absence_sigma=1/16``:
    each component's occupancy blurred over about a compartment, against the training images'
    at the same place), marked in the fused map only above its typical good-image peak and cut
    at the image's score: fused AU-sPRO@0.05 +0.014 paired over seeds 20, 22, 23 and 25 (every
    seed up, +0.006 to +0.017; logical subset +0.036, structural -0.007), the rule fixed before
    seeds 20, 23 and 25 were measured, image AUROC unchanged. It finds missing pins, separators
    and toppings (pushpins +0.086, breakfast_box +0.026) and costs screw_bag -0.023 and
    juice_bottle -0.014 on average, where parts lie anywhere or good images vary most
    (docs/ACCURACY.md, ablations 61-65).
    """
    structural = replace(
        StructuralConfig(),
        backbone="efficientnet_lite0",
        image_size=384,
        levels=("layer1", "layer2", "layer3"),
        grid_level="layer2",
        bank_rotations=(-3.0, 3.0),
        density_k=3,
    )
    return BuildConfig(
        preset="cpu",
        logical=cpu_preset(),
        structural=structural,
        train=cpu_train_preset(),
        fusion=FusionConfig(
            logical_weight=0.5,
            structural_weight=1.0,
            composition_weight=1.0,
            positional_weight=2.0,
            merge="max",
            image_scale="pooled",
            composition_scale="robust",
            positional_role="shape",
            placement_power=16.0,
        ),
        composition=CompositionConfig(enabled=True, members=3, absence_sigma=1 / 16),
        positional=PositionalConfig(enabled=True, dims=64),
    )


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
