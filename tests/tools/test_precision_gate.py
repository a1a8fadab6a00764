"""tools.precision_gate: fp16 keeps the fp32 metrics of the tiny build; the verdict logic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.data.loco import LocoDataset
from tools import precision_gate

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fp16_passes_the_accuracy_gate(tiny_build: dict[str, Path], device: str) -> None:
    dataset = LocoDataset(tiny_build["data"], "pushpins")
    report = precision_gate.gate(tiny_build["artifact"], dataset, device, ["fp16"])
    assert report["fp16"]["passed"], report["fp16"]["worst_change"]
    assert set(report["fp32"]["auroc"]) == {"logical_anomalies", "structural_anomalies", "mean"}


def test_worst_change_skips_undefined_subsets() -> None:
    reference = {"auroc": {"mean": 0.9, "logical": None}, "spro": {"mean": 0.5}}
    lowered = {"auroc": {"mean": 0.897, "logical": 0.7}, "spro": {"mean": 0.5}}
    changes = precision_gate.worst_changes(reference, lowered)
    assert changes == {"auroc": pytest.approx(0.003), "spro": 0.0}


def test_cli_refuses_a_missing_category(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--artifact", str(tmp_path), "--data-root", str(tmp_path), "--category", "none"]
    assert precision_gate.main(argv) == 2
    assert "none: category folder not found" in capsys.readouterr().err


def test_swap_step_is_one_pair_of_the_smallest_subset(tiny_loco: Path) -> None:
    # tiny_loco: 3 good, 3 logical and 3 structural test images.
    dataset = LocoDataset(tiny_loco, "pushpins")
    assert precision_gate.swap_step(dataset) == pytest.approx(1 / 9)
