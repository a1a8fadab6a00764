"""Presets, the auto choice between them, and the declared types of every config field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import config as config_module
from engine.calibrate import FusionConfig
from engine.config import BuildConfig, cpu_build_preset, paper_preset, parse_value, resolve_preset
from engine.models.logical import LogicalConfig


def test_auto_on_cpu_picks_cpu_and_says_why() -> None:
    chosen, why = resolve_preset("auto", torch.device("cpu"))
    assert chosen.preset == "cpu" and chosen.logical.backbone == "efficientnet_lite0"
    assert "no CUDA device" in why


def test_auto_on_cuda_without_weights_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "find_torch_home_checkpoint", lambda arch: None)
    chosen, why = resolve_preset("auto", torch.device("cuda"))
    assert chosen.preset == "cpu"
    assert "resnet101" in why and "resnext101_32x8d" in why and "no CUDA" not in why


def test_auto_on_cuda_with_weights_picks_paper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "find_torch_home_checkpoint", lambda arch: Path(arch))
    chosen, why = resolve_preset("auto", torch.device("cuda"))
    assert chosen.preset == "paper" and chosen.logical.backbone == "resnet101"
    assert chosen.structural.backbone == "resnext101_32x8d" and chosen.train.epochs == 50
    assert chosen.train.batch_size == 1 and "paper" in why


def test_explicit_presets_and_bad_name() -> None:
    assert resolve_preset("paper", torch.device("cpu"))[0].logical.image_size == 256
    assert resolve_preset("cpu", torch.device("cpu"))[0].structural.feature_dim == 1024
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("fastest", torch.device("cpu"))


def test_branches_beyond_the_paper_are_on_in_the_cpu_preset_only() -> None:
    paper, _ = resolve_preset("paper", torch.device("cpu"))
    cpu, _ = resolve_preset("cpu", torch.device("cpu"))
    assert not paper.composition.enabled and not paper.positional.enabled
    assert cpu.composition.enabled and cpu.positional.enabled


@pytest.mark.parametrize(
    ("declared", "text", "expected"),
    [
        (bool, "no", False),
        (bool, "Yes", True),
        (bool, "0", False),
        (bool, "true", True),
        (int, "3", 3),
        (float, "1e-3", 1e-3),
        (float, "2", 2.0),
        (str, "learned", "learned"),
        (str | None, "null", None),
        (int | None, "none", None),
        (int | None, "4", 4),
        (tuple[float, float], "0.4,0.9", (0.4, 0.9)),
        (tuple[float, float], "[0.4, 0.9]", (0.4, 0.9)),
        (tuple[int, ...], "2,2,1", (2, 2, 1)),
        (tuple[str, ...], "layer2,layer3", ("layer2", "layer3")),
    ],
)
def test_command_line_values_become_their_field_type(declared, text: str, expected) -> None:
    value = parse_value(declared, text, "section.field")
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("declared", "text", "expected"),
    [
        (float, "abc", "a number"),
        (int, "abc", "an integer"),
        (int, "2.5", "an integer"),
        (int, "true", "an integer"),
        (bool, "maybe", "true or false"),
        (bool, "2", "true or false"),
        (tuple[float, float], "0.5", "2 comma-separated values"),
        (tuple[int, ...], "1,x", "an integer"),
        (int, "null", "an integer"),
    ],
)
def test_command_line_values_of_the_wrong_type_are_refused(declared, text, expected) -> None:
    with pytest.raises(ValueError, match=rf"section\.field(\[\d\])? expects {expected}"):
        parse_value(declared, text, "section.field")


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"allow_random": "yes"}, "allow_random"),
        ({"train": {"amp": "no"}}, r"train\.amp"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs"),
        ({"logical": {"image_size": "abc"}}, r"logical\.image_size"),
        ({"fusion": {"sigma": True}}, r"fusion\.sigma"),
        ({"structural": {"levels": "layer2"}}, r"structural\.levels"),
        ({"train": []}, "train"),
        ({"clip_checkpoint": 3}, "clip_checkpoint"),
    ],
)
def test_manifest_config_values_must_have_their_field_type(values: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BuildConfig.from_dict({**cpu_build_preset().to_dict(), **values})


def test_configs_built_in_code_are_type_checked_too() -> None:
    with pytest.raises(ValueError, match="allow_random expects true or false"):
        BuildConfig(allow_random="no")
    odd_logical = replace(LogicalConfig(), backbone=101)
    with pytest.raises(ValueError, match=r"logical\.backbone expects a string"):
        BuildConfig(logical=odd_logical)
    assert BuildConfig(fusion=FusionConfig(logical_weight=3)).fusion.logical_weight == 3


def test_a_manifest_from_before_positional_role_keeps_the_positional_memory_in_the_score() -> None:
    """Artifacts built before ``fusion.positional_role`` existed fuse as they were built: the
    positional map raises the image score like the other map branches."""
    values = cpu_build_preset().to_dict()
    assert values["fusion"].pop("positional_role") == "shape"
    old = BuildConfig.from_dict(values)
    assert old.fusion.positional_role == "score" and old.fusion.capped == ()
    assert cpu_build_preset().fusion.capped == ("positional",)


def test_the_cpu_preset_weighs_bank_distances_by_local_spacing_and_old_manifests_do_not() -> None:
    """ablation 37 adopted ``structural.density_k=3`` in the cpu preset only; a manifest written
    before the field existed keeps PatchCore's plain distance (its state has no row scales)."""
    assert cpu_build_preset().structural.density_k == 3
    assert paper_preset().structural.density_k == 0
    values = cpu_build_preset().to_dict()
    values["structural"].pop("density_k")
    assert BuildConfig.from_dict(values).structural.density_k == 0


def test_the_cpu_preset_halves_the_logical_evidence_and_the_paper_keeps_its_weights() -> None:
    """ablation 54 adopted ``fusion.logical_weight=0.5`` in the cpu preset; the paper preset keeps
    structural:logical = 1:3."""
    assert cpu_build_preset().fusion.logical_weight == 0.5
    assert cpu_build_preset().fusion.structural_weight == 1.0
    paper = paper_preset().fusion
    assert (paper.structural_weight, paper.logical_weight) == (1.0, 3.0)


def test_the_cpu_preset_fits_three_composition_members_and_says_how_to_add_windows() -> None:
    """ablation 44 adopted ``composition.members=3`` in the cpu preset; fine parts and windows
    are refused beside it with the setting that allows them."""
    assert cpu_build_preset().composition.members == 3
    assert paper_preset().composition.members == 1
    values = cpu_build_preset().to_dict()
    values["composition"]["windows"] = [6, 4]
    with pytest.raises(ValueError, match=r"--set composition\.members=1"):
        BuildConfig.from_dict(values)
