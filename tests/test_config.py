"""Presets and the auto choice between them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import config as config_module
from engine.config import resolve_preset


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
