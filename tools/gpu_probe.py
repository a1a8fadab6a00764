"""Whole-Runtime checks of one artifact on a GPU: optimised backends == eager, latency,
throughput, host syncs.

    python -m tools.gpu_probe --artifact A --out DIR [--frames 30] [--batch 32]

For each case (``eager`` in fp32, bf16 and fp16, then ``graph`` in fp32 and bf16, then
``compile`` in fp32, then ``onnx`` in fp32 where onnxruntime-gpu is installed and ``tensorrt``
in fp32 where its provider and TensorRT are, each else recorded as skipped) on one 640x480
frame: load + warm-up time, batch-1 latency p50/p95 over
``--frames`` warm frames, images per second at ``--batch`` (after a warm-up at that batch),
every host synchronisation of one warm frame (listed by ``torch.cuda.set_sync_debug_mode
("warn")`` with the line that caused it) and per-stage CUDA-event times of one warm frame
(eager and compile only: a replayed graph has no stages). Each case's fused map is compared with
``eager``'s in the same precision (and the 16-bit ones with fp32). ``DIR/gpu_probe.json`` and
``DIR/host_syncs.txt`` are rewritten after every case, so a run stopped by a time limit keeps
what it measured. Exits 1 when an optimised backend differs from ``eager`` beyond the
tolerance, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from engine.backends.onnx import onnx_cuda_available
from engine.backends.tensorrt import tensorrt_missing
from engine.cli import description, setup_logging
from engine.stage_timer import StageTimer

TOLERANCE = 1e-3  # max |backend - eager| on the fused map, relative to its range


def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)


def host_syncs(runtime, image: np.ndarray) -> list[str]:
    """``file:line: message`` of every host sync during one call of ``runtime``."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runtime(image)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [
        f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}"
        for w in caught
        if "called a synchronizing" in str(w.message)  # not the mode's own "prototype" notice
    ]


def latencies_ms(runtime, image: np.ndarray, frames: int) -> list[float]:
    out = []
    for _ in range(frames):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runtime(image)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1e3)
    return out


CASES = (
    ("eager", "fp32"),
    ("eager", "bf16"),
    ("eager", "fp16"),
    ("graph", "fp32"),
    ("graph", "bf16"),
    ("compile", "fp32"),
    ("onnx", "fp32"),  # only with ONNX Runtime's CUDA provider (onnxruntime-gpu)
    ("tensorrt", "fp32"),  # only with ONNX Runtime's TensorRT provider and TensorRT's libraries
)
THROUGHPUT_CALLS = 5


def images_per_second(runtime, image: np.ndarray, batch: int) -> float:
    """Warm throughput at ``batch`` copies of ``image`` per call (one tensor batch)."""
    frames = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(image, (batch, *image.shape))))
    runtime.warmup(size=image.shape[:2], iterations=2, batch=batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(THROUGHPUT_CALLS):
        runtime(frames)
    torch.cuda.synchronize()
    return batch * THROUGHPUT_CALLS / (time.perf_counter() - start)


def probe(
    artifact: Path, backend: str, precision: str, frames: int, batch: int
) -> tuple[dict, np.ndarray, list[str]]:
    from engine import Runtime

    image = frame()
    start = time.perf_counter()
    runtime = Runtime.load(artifact, device="cuda", backend=backend, precision=precision)
    runtime.warmup()
    ready_s = time.perf_counter() - start
    times = latencies_ms(runtime, image, frames)
    result = runtime(image)
    syncs = host_syncs(runtime, image)
    stages = {}
    if runtime.backend != "graph":  # a replay runs no Python stage code to time
        runtime.detector.stage_timer = timer = StageTimer(runtime.device)
        runtime(image)
        stages = {name: round(ms, 3) for name, ms in timer.elapsed_ms().items()}
        runtime.detector.stage_timer = None
    summary = {
        "backend": runtime.backend,
        "precision": precision,
        "load_and_warmup_s": round(ready_s, 2),
        "p50_ms": round(statistics.median(times), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        f"images_per_s_b{batch}": round(images_per_second(runtime, image, batch), 1),
        "host_syncs_per_frame": len(syncs),
        "stage_ms": stages,
    }
    return summary, result.anomaly_map, syncs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_probe", description=description(__doc__)
    )
    parser.add_argument("--artifact", type=Path, required=True, help="artifact folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--frames", type=int, default=30, help="timed frames per backend")
    parser.add_argument("--batch", type=int, default=32, help="batch of the throughput figure")
    args = parser.parse_args(argv)
    setup_logging()
    if not torch.cuda.is_available():
        print("gpu_probe: needs a CUDA device; torch sees none", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    # None until an optimised case has finished: a run cut short claims nothing.
    maps, listing, equal = {}, [], None
    for backend, precision in CASES:
        name = f"{backend}-{precision}"
        if backend == "onnx" and not onnx_cuda_available():
            report[name] = {"skipped": "no onnxruntime with the CUDA provider"}
            continue
        missing = tensorrt_missing() if backend == "tensorrt" else None
        if missing is not None:
            report[name] = {"skipped": f"needs {missing}"}
            continue
        summary, maps[name], syncs = probe(
            args.artifact, backend, precision, args.frames, args.batch
        )
        eager = maps[f"eager-{precision}"]
        if backend != "eager":
            summary["max_rel_diff_vs_eager"] = relative_difference(maps[name], eager)
            equal = equal is not False and summary["max_rel_diff_vs_eager"] <= TOLERANCE
        if precision != "fp32":
            summary["max_rel_diff_vs_fp32"] = relative_difference(maps[name], maps["eager-fp32"])
        report[name] = summary
        listing += [f"[{name}] {line}" for line in syncs] or [f"[{name}] no host syncs"]
        print(json.dumps({"case": name, **summary}), flush=True)
        report["optimised_equal_eager"] = equal
        (args.out / "gpu_probe.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "host_syncs.txt").write_text("\n".join(listing) + "\n")
    print(f"the optimised backends == eager within {TOLERANCE} of the map's range: {equal}")
    return 0 if equal else 1  # never None here: the optimised cases have run


def relative_difference(a: np.ndarray, reference: np.ndarray) -> float:
    """max |a - reference| over the reference map's value range."""
    scale = float(reference.max() - reference.min()) or 1.0
    return float(np.abs(a - reference).max()) / scale


if __name__ == "__main__":
    sys.exit(main())
