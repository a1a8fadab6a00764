"""End-to-end frame latency of the inference path (``Detector``, what ``Runtime`` runs).

One 640x480 uint8 frame in, fused map at model resolution out: preprocessing, both branches
(structural on its own CUDA stream on GPU), fusion. Weights are random (timing only: the
architecture, not the values, sets the cost); the memory bank has the size a LOCO category
gives (10% of 360 images' patches). CPU: the ``cpu`` preset, eager. CUDA: the ``paper`` preset,
eager vs ``torch.compile`` side by side, batch 1. Run:
``pytest benchmarks/test_runtime_speed.py --benchmark-only``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.backends import apply_backend
from engine.calibrate import BranchStats
from engine.config import cpu_build_preset, paper_preset
from engine.detector import Detector
from engine.models.logical import LogicalModel
from engine.models.structural import StructuralModel

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TRAIN_IMAGES, CORESET_RATIO = 360, 0.1


def random_detector(preset: str) -> Detector:
    config = paper_preset() if preset == "paper" else cpu_build_preset()
    config = replace(config, weights="random", allow_random=True)
    torch.manual_seed(0)
    logical = LogicalModel.build(config.logical, None, "random", True, verbose=False)
    structural = StructuralModel.from_config(config.structural, "random", True, verbose=False)
    grid = (config.structural.image_size // 8) ** 2
    bank_rows = int(TRAIN_IMAGES * grid * CORESET_RATIO)
    structural.set_bank(torch.randn(bank_rows, config.structural.feature_dim))
    stats = BranchStats(0.5, 0.1)
    detector = Detector(
        logical,
        structural,
        config.fusion,
        stats,
        stats,
        structural_size=config.structural.image_size,
    )
    return detector.to(DEVICE)


def frame() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (1, 480, 640, 3), dtype=torch.uint8, generator=gen).to(DEVICE)


def run_once(detector: Detector, frames: torch.Tensor) -> torch.Tensor:
    maps = detector(frames)
    if CUDA:
        torch.cuda.synchronize()
    assert maps.fused is not None
    return maps.fused


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_frame_latency(benchmark: object, backend: str) -> None:
    if backend == "compile" and not CUDA:
        pytest.skip("torch.compile is timed on CUDA only (minutes of compilation on CPU)")
    preset = "paper" if CUDA else "cpu"
    detector = random_detector(preset)
    apply_backend(detector, backend)
    frames = frame()
    for _ in range(3):  # compilation, autotuning, allocator warm-up
        run_once(detector, frames)
    benchmark.group = f"frame latency ({preset} preset, {DEVICE.type})"
    fused = benchmark.pedantic(
        run_once, args=(detector, frames), rounds=20 if CUDA else 5, iterations=1
    )
    assert torch.isfinite(fused).all()
    benchmark.extra_info.update(
        {"device": torch.cuda.get_device_name() if CUDA else "cpu", "preset": preset}
    )
