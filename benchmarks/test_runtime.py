"""Whole-Runtime frame latency: ``Runtime.load(artifact)`` then ``rt(frames)``, as a user runs it.

Cases are named ``test_runtime[<backend>-<precision>-b<batch>]``: every backend that can run
here, batch 1 and a larger batch (8 on CPU, 32 on CUDA), 640x480 uint8 frames, the ``cpu``
preset on CPU and the ``paper`` preset on CUDA, with every branch the preset turns on (the
``cpu`` preset's composition branch and positional memory included). Weights are random
(timing only: the architecture, not the values, sets the cost); the memory bank and the
positional memory have the size a LOCO category gives (10 % of 360 images' patches; 360
images), the bank searched with the index the Runtime picks; the branches are calibrated on
random frames. Each case
records in ``extra_info``: p50/p95 per call, images/s, per-stage times of one call (CUDA events
on GPU), the first call after loading (compile autotune and, on a cold cache, ONNX export
included), the peak extra GPU memory, and the largest difference of its fused maps from
``eager``'s (fp32, compact features) on the same frames. ``python -m tools.bench_report
FILE.json`` turns a ``--benchmark-json`` file into the table of ``docs/PERFORMANCE.md``, with
each case's ratio to ``eager`` from the same run. ``test_bank_coordinates`` times compact
against full-coordinate patch features (the same distances; see ``engine.models.structural``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import Runtime
from engine.artifact import save_artifact
from engine.backends.onnx import onnx_cuda_available
from engine.calibrate import BranchStats
from engine.config import BuildConfig, cpu_build_preset, paper_preset
from engine.detector import Detector
from engine.models.composition import CompositionModel
from engine.models.logical import LogicalModel
from engine.models.positional import PositionalModel
from engine.models.structural import PatchFeatures, StructuralModel, attach_index
from engine.stage_timer import StageTimer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = "paper" if CUDA else "cpu"
TRAIN_IMAGES, CORESET_RATIO = 360, 0.1
BATCHES = (1, 32) if CUDA else (1, 8)
BACKENDS = ("eager", "compile", "onnx")
# 16-bit runs where it pays: on CUDA (CPUs without bf16/fp16 matrix units only get slower).
PRECISIONS = ("fp32", "bf16", "fp16") if CUDA else ("fp32",)
_EAGER_MAPS: dict[int, np.ndarray] = {}  # batch -> eager fused maps of the compact artifact


def random_detector(config: BuildConfig) -> Detector:
    """An uncalibrated random-weight detector of ``config`` with a LOCO-size random memory bank,
    and the preset's composition branch and positional memory fitted on random patch features
    (the positional memory holding ``TRAIN_IMAGES`` images, as a LOCO-size build does). With
    full patch coordinates they are the compact detector's branches carried over, so that both
    artifacts give the same maps."""
    torch.manual_seed(0)
    logical = LogicalModel.build(config.logical, None, "random", True, verbose=False)
    structural = StructuralModel.from_config(config.structural, "random", True, verbose=False)
    side = config.structural.image_size // 8
    bank_rows = int(TRAIN_IMAGES * side * side * CORESET_RATIO)
    # Rows drawn in compact coordinates, mapped to full ones where needed: both artifacts then
    # hold the same bank and must give the same maps.
    pf = structural.patch_features
    basis = PatchFeatures(pf.backbone, pf.feature_dim, pf.patch_size, compact=True).basis
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(
        bank_rows, pf.feature_dim if basis is None else basis.shape[1], generator=generator
    )
    full = pf.basis is None and basis is not None
    structural.set_bank(rows @ basis.t() if full else rows)
    attach_index(structural, config.structural.index, "cpu")
    branches = fitted_branches(config, (side, side), rows.shape[1])
    if full:
        branches = {name: to_full(module, basis) for name, module in branches.items()}
    return Detector(
        logical,
        structural,
        config.fusion,
        structural_size=config.structural.image_size,
        **branches,
    )


def fitted_branches(config: BuildConfig, grid: tuple[int, int], dim: int) -> dict:
    """The composition branch (fitted on 20 images: its cost does not grow with them; with
    several fits or distances, and its absence map, standardised on 8 more, as a build does on
    validation) and the positional memory (``TRAIN_IMAGES`` images) that ``config`` enables, on
    random features."""
    generator = torch.Generator().manual_seed(1)
    branches = {}
    if config.composition.enabled:
        train = torch.randn(20, grid[0] * grid[1], dim, generator=generator)
        composition = CompositionModel(config.composition, dim, grid).fit(train, grid)
        more = torch.randn(8, grid[0] * grid[1], dim, generator=generator)
        if composition.n_groups > 1:  # several fits (the cpu preset): standardised on 8 more
            composition.calibrate_groups(composition.group_distances(more, grid))
        if composition.absence is not None:
            composition.absence.calibrate(composition.absence_peaks(more, grid))
        branches["composition"] = composition
    if config.positional.enabled:
        settings = config.positional
        train = torch.randn(TRAIN_IMAGES, grid[0] * grid[1], dim, generator=generator)
        rows = settings.memory_rows(TRAIN_IMAGES)
        branches["positional"] = PositionalModel(settings, dim, grid, rows).fit(train, grid)
    return branches


def to_full(module: nn.Module, basis: torch.Tensor) -> nn.Module:
    """``module`` (fitted on compact features ``f``) for full-coordinate features
    ``f @ basis.T``: its feature means and projections rotated by ``basis`` (every composition
    fit's, ``members.*`` included), the rest as it is."""
    state = module.state_dict()
    dim = basis.shape[0]
    if isinstance(module, PositionalModel):
        full = PositionalModel(module.config, dim, module.grid, module.memory.shape[0])
        mean, projection = "mean", "basis"
    else:
        full = CompositionModel(module.config, dim, module.grid)
        mean, projection = "feature_mean", "projection"
    for key in state:
        name = key.rsplit(".", 1)[-1]
        if name == mean:
            state[key] = state[key] @ basis.t()
        elif name == projection:
            state[key] = basis @ state[key]
    full.load_state_dict(state)
    return full


Calibration = tuple[dict[str, BranchStats], dict[str, BranchStats]]


def random_frame_calibration(detector: Detector) -> Calibration:
    """Each branch's pixel and image-score statistics on four random frames, standing in for a
    build's validation images: every branch then shapes the fused map, rather than the one
    whose random-weight scores happen to be largest, and the maps compared with eager's carry
    every branch."""
    maps = detector(frames(4).to(detector.device)).branches()
    pixel = {b: BranchStats(float(m.mean()), float(m.std())) for b, m in maps.items()}
    peaks = {b: ((m - pixel[b].mean) / pixel[b].std).amax((1, 2)) for b, m in maps.items()}
    image = {b: BranchStats(float(p.mean()), max(float(p.std()), 1e-3)) for b, p in peaks.items()}
    return pixel, image


def make_artifact(
    folder: Path, info: dict, compact: bool = True, calibration: Calibration | None = None
) -> tuple[Path, Calibration]:
    """A random-weight artifact of the preset timed here, written through the public API, and
    its calibration (``calibration`` when given, else :func:`random_frame_calibration`)."""
    config = paper_preset() if PRESET == "paper" else cpu_build_preset()
    structural = replace(config.structural, compact_features=compact)
    config = replace(
        config, weights="random", allow_random=True, text_prior="learned", structural=structural
    )
    detector = random_detector(config)
    calibration = calibration or random_frame_calibration(detector)
    detector.fusion.calibrate(*calibration)
    return save_artifact(folder / "artifact", detector, config, info), calibration


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, timing_info: dict) -> dict[bool, Path]:
    """Compact and full-coordinate artifacts holding the same bank and calibration."""
    root = tmp_path_factory.mktemp("runtime-bench")
    compact, calibration = make_artifact(root / "compact", timing_info)
    full, _ = make_artifact(root / "full", timing_info, False, calibration)
    return {True: compact, False: full}


def frames(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(0, 256, (batch, 480, 640, 3), dtype=torch.uint8, generator=gen)


def fused(runtime: Runtime, batch: torch.Tensor) -> np.ndarray:
    return np.stack([r.anomaly_map for r in runtime(batch, color="rgb")])


def eager_maps(artifact: Path, batch: int) -> np.ndarray:
    if batch not in _EAGER_MAPS:
        _EAGER_MAPS[batch] = fused(
            Runtime.load(artifact, device=DEVICE, backend="eager"), frames(batch)
        )
    return _EAGER_MAPS[batch]


def timed_runtime(
    benchmark, artifacts: dict, backend: str, batch: int, compact: bool, precision: str = "fp32"
) -> None:
    artifact = artifacts[compact]
    start = time.perf_counter()
    runtime = Runtime.load(artifact, device=DEVICE, backend=backend, precision=precision)
    data = frames(batch)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    first = fused(runtime, data)
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(2):  # allocator and autotune warm-up
        fused(runtime, data)
    maps = benchmark.pedantic(
        fused, args=(runtime, data), rounds=20 if CUDA else 5, iterations=1, warmup_rounds=0
    )
    assert np.isfinite(maps).all() and np.array_equal(maps.shape, first.shape)
    runtime.detector.stage_timer = timer = StageTimer(runtime.device)
    fused(runtime, data)
    runtime.detector.stage_timer = None
    reference = eager_maps(artifacts[True], batch)
    times = np.asarray(benchmark.stats.stats.data) * 1e3
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if CUDA else "cpu",
            "preset": PRESET,
            "backend": runtime.backend,
            "precision": runtime.precision,
            "batch": batch,
            "features": "compact" if compact else "full",
            "p50_ms": float(np.median(times)),
            "p95_ms": float(np.percentile(times, 95)),
            "images_per_s": batch / float(np.median(times)) * 1e3,
            "first_call_ms": first_ms,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if CUDA else None,
            "max_map_diff_vs_eager": float(np.abs(maps - reference).max()),
            "stage_ms": timer.elapsed_ms(),
        }
    )


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime(benchmark, artifacts: dict, backend: str, precision: str, batch: int) -> None:
    if backend == "compile" and not CUDA:
        pytest.skip("compile is timed on CUDA only (minutes of compilation on CPU, no gain)")
    if backend == "onnx" and CUDA and not onnx_cuda_available():
        pytest.skip("the onnx backend on CUDA needs onnxruntime-gpu")
    if backend == "onnx" and precision != "fp32":
        pytest.skip("the onnx backend runs float32 graphs only")
    benchmark.group = f"runtime ({PRESET} preset, {DEVICE.type}, b{batch})"
    timed_runtime(benchmark, artifacts, backend, batch, compact=True, precision=precision)


@pytest.mark.skipif(CUDA, reason="the paper preset's features are full-rank: nothing to compare")
@pytest.mark.parametrize("features", ["compact", "full"])
def test_bank_coordinates(benchmark, artifacts: dict, features: str) -> None:
    benchmark.group = "runtime (cpu preset, cpu, b1): compact vs full patch features"
    timed_runtime(benchmark, artifacts, "eager", 1, compact=features == "compact")
