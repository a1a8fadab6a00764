"""CPU frame latency with a memory bank of *real* patch features, per backend and kNN index.

``test_runtime`` times random weights against a random bank: right for the networks, wrong for
approximate search, whose cost and recall depend on how the features are distributed (HNSW and
inverted lists are fast on clustered data). Here the cpu preset's pretrained backbones extract the
patch features of 350 synthetic pushpins training images (a LOCO-size category); a seeded random
10 % of them is the bank (the greedy coreset would add two minutes to the setup; its size is
the same). The logical decoder keeps random weights (its cost does not depend on them), the
composition branch is fitted on 60 of the images and the positional memory on all 350, as the
preset builds it, and each artifact is calibrated on the category's four validation images.
Cases ``test_runtime_real_bank[<backend>-<index>]`` time one 640x480 frame per call, cycling
through 12 frames made from the category's test images; ``python -m tools.bench_report`` gives
each case's speed-up over ``eager`` with the same index from the same run. Those cases run one
after another, and on a shared machine one case's p50 can move by 30 % between runs;
``test_runtime_real_bank_paired[<index>]`` compares ``onnx`` with ``eager`` frame by frame
instead (each round scores one frame with both, in alternating order), so that the machine's
drift hits both alike.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Runtime
from engine.artifact import save_artifact
from engine.composition_calibration import calibrate_composition, needs_calibration
from engine.config import cpu_build_preset
from engine.data.formats import open_dataset
from engine.data.images import read_rgb
from engine.data.synthetic import generate_category
from engine.detector import Detector, model_transform
from engine.models.composition import CompositionModel
from engine.models.knn_index import auto_faiss_spec, auto_index_params
from engine.models.logical import LogicalModel
from engine.models.positional import PositionalModel
from engine.models.structural import StructuralModel, attach_index
from engine.pipeline import calibrate, validation_maps

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU frame latency (the cpu preset); CUDA runs test_runtime"
)
TRAIN_IMAGES, BANK_RATIO, FRAMES = 350, 0.1, 12
INDEXES = {  # case id -> (structural.index, structural.index_params)
    "Flat": ("Flat", ""),
    "HNSW32": ("HNSW32", ""),
    "IVF512-nprobe32": ("IVF512,Flat", "nprobe=32"),
    "IVF1024-nprobe8": ("IVF1024,Flat", "nprobe=8"),
    "auto": ("IVF256,PQ88x4fs,RFlat", "nprobe=8"),  # what structural.index=auto builds here
}
BACKENDS = ("eager", "onnx")
PAIRED = ("auto",)  # the index of the CPU speed-up target (docs/PERFORMANCE.md)
_EAGER_MAPS: dict[str, np.ndarray] = {}


def _features(
    structural: StructuralModel, size: int, paths: list[Path]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, h*w, D) patch features of the images at ``paths``, and their (h, w) grid."""
    transform = model_transform(size, structural.patch_features.backbone)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(paths), 16):
            frames = torch.from_numpy(np.stack([read_rgb(p) for p in paths[start : start + 16]]))
            batch = transform.batch(frames, channels_last=True)
            features, grid = structural.patch_features(batch)
            chunks.append(features.float())
    return torch.cat(chunks), grid


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory, timing_info: dict) -> dict:
    """Artifacts per index (same weights and bank) and the frames to score."""
    root = tmp_path_factory.mktemp("real-bank")
    test_each = FRAMES // 3  # good, logical and structural test images
    folder = generate_category(
        root, "pushpins", 0, None, TRAIN_IMAGES, 4, test_each, test_each, test_each, progress=False
    )
    config = cpu_build_preset()
    size = config.structural.image_size
    structural = StructuralModel.from_config(config.structural, "auto", False, verbose=False)
    if structural.patch_features.backbone.weights.source == "random":
        pytest.skip("the cpu preset's pretrained backbone weights are not installed")
    train = sorted((folder / "train" / "good").glob("*.png"))
    features, grid = _features(structural, size, train)
    rows = features.reshape(-1, features.shape[-1])
    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
    structural.set_bank(rows[pick[: int(rows.shape[0] * BANK_RATIO)]].contiguous())
    auto = auto_faiss_spec(*structural.bank.shape)
    assert INDEXES["auto"] == (auto, auto_index_params(auto))
    torch.manual_seed(0)
    logical = LogicalModel.build(config.logical, None, "auto", False, verbose=False)
    composition = CompositionModel(config.composition, int(features.shape[-1]), grid)
    composition.fit(features[:60], grid)
    settings = config.positional
    positional = PositionalModel(
        settings, int(features.shape[-1]), grid, settings.memory_rows(len(features))
    ).fit(features, grid)
    validation = open_dataset(root, "pushpins").samples("validation")
    artifacts = {}
    for case, (spec, params) in INDEXES.items():
        case_config = replace(
            config,
            text_prior="learned",
            structural=replace(config.structural, index=spec, index_params=params),
        )
        attach_index(structural, spec, "cpu", params)
        detector = Detector(
            logical,
            structural,
            config.fusion,
            structural_size=size,
            composition=composition,
            positional=positional,
        )
        # Calibrated as a build calibrates, so the fused map weighs every branch as it would
        # in a build, and its differences from eager are in the map's real units.
        grouped = composition.n_groups > 1
        if needs_calibration(composition):
            calibrate_composition(detector, validation, False)
        maps = validation_maps(detector, validation, False)
        calibrate(detector.fusion, maps, config.fusion, composition_calibrated=grouped)
        artifacts[case] = save_artifact(root / case, detector, case_config, timing_info)
    frames = [
        np.asarray(Image.open(p).convert("RGB").resize((640, 480), Image.BILINEAR))
        for p in sorted((folder / "test").glob("*/*.png"))
    ]
    return {"artifacts": artifacts, "frames": frames}


def _maps(runtime: Runtime, frames: list[np.ndarray]) -> np.ndarray:
    return np.stack([runtime(frame, color="rgb").anomaly_map for frame in frames])


@pytest.mark.parametrize("index", list(INDEXES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_real_bank(benchmark, category: dict, backend: str, index: str) -> None:
    benchmark.group = f"runtime (cpu preset, cpu, b1, real bank, {index})"
    artifact, frames = category["artifacts"][index], category["frames"]
    start = time.perf_counter()
    runtime = Runtime.load(artifact, device="cpu", backend=backend)
    runtime(frames[0], color="rgb")
    first_ms = (time.perf_counter() - start) * 1e3
    maps = _maps(runtime, frames)  # warm-up, and the maps compared with eager's
    if index not in _EAGER_MAPS:
        eager = Runtime.load(artifact, device="cpu", backend="eager")
        _EAGER_MAPS[index] = maps if runtime.backend == "eager" else _maps(eager, frames)
    cycle = itertools.cycle(frames)
    benchmark.pedantic(lambda: runtime(next(cycle), color="rgb"), rounds=2 * FRAMES, iterations=1)
    times = np.asarray(benchmark.stats.stats.data) * 1e3
    benchmark.extra_info.update(
        {
            "device": "cpu",
            "preset": "cpu (real bank)",
            "index": index,
            "backend": runtime.backend,
            "precision": runtime.precision,
            "batch": 1,
            "features": "compact",
            "p50_ms": float(np.median(times)),
            "p95_ms": float(np.percentile(times, 95)),
            "images_per_s": 1e3 / float(np.median(times)),
            "first_call_ms": first_ms,
            "peak_mib": None,
            "max_map_diff_vs_eager": float(np.abs(maps - _EAGER_MAPS[index]).max()),
        }
    )


def _median_interval(ratios: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the median of ``ratios``."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, (2000, ratios.size)), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


@pytest.mark.parametrize("index", PAIRED)
def test_runtime_real_bank_paired(benchmark, category: dict, index: str) -> None:
    pytest.importorskip("onnxruntime")
    benchmark.group = f"runtime paired (cpu preset, cpu, b1, real bank, {index})"
    artifact, frames = category["artifacts"][index], category["frames"]
    runtimes = [Runtime.load(artifact, device="cpu", backend=b) for b in BACKENDS]
    maps = [_maps(runtime, frames) for runtime in runtimes]  # warm-up, and the maps compared
    seconds = {runtime.backend: [] for runtime in runtimes}
    rounds = itertools.count()

    def pair() -> None:
        i = next(rounds)
        frame = frames[i % len(frames)]
        for runtime in runtimes[:: 1 if i % 2 else -1]:
            start = time.perf_counter()
            runtime(frame, color="rgb")
            seconds[runtime.backend].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=4 * FRAMES, iterations=1)
    ms = {backend: np.asarray(seconds[backend]) * 1e3 for backend in BACKENDS}
    ratios = ms["eager"] / ms["onnx"]
    low, high = _median_interval(ratios)
    benchmark.extra_info.update(
        {
            "device": "cpu",
            "preset": "cpu (real bank)",
            "index": index,
            "paired": {
                "backends": list(BACKENDS),
                "rounds": int(ratios.size),
                **{f"{b}_p50_ms": float(np.median(t)) for b, t in ms.items()},
                "speedup_median": float(np.median(ratios)),
                "speedup_ci95": [low, high],
                "max_map_diff_vs_eager": float(np.abs(maps[1] - maps[0]).max()),
            },
        }
    )
