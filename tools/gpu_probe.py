"""Whole-Runtime checks of one artifact on a GPU: compile == eager, latency, host syncs.

    python -m tools.gpu_probe --artifact A --out DIR [--frames 30]

For each backend (``eager``, then ``compile``) on one 640x480 frame: batch-1 latency p50/p95
over ``--frames`` warm frames, and every host synchronisation of one warm frame, listed by
``torch.cuda.set_sync_debug_mode("warn")`` with the line that caused it. The maps of
``compile`` are compared with ``eager``'s. Writes ``DIR/gpu_probe.json`` and
``DIR/host_syncs.txt``; exits 1 when the maps differ beyond the tolerance, 2 without CUDA.
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

from engine.cli import description, setup_logging

TOLERANCE = 1e-3  # max |compile - eager| on the fused map, relative to its range


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
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught]


def latencies_ms(runtime, image: np.ndarray, frames: int) -> list[float]:
    out = []
    for _ in range(frames):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runtime(image)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def probe(artifact: Path, backend: str, frames: int) -> tuple[dict, np.ndarray, list[str]]:
    from engine import Runtime

    image = frame()
    start = time.perf_counter()
    runtime = Runtime.load(artifact, device="cuda", backend=backend)
    runtime.warmup()
    ready_s = time.perf_counter() - start
    times = latencies_ms(runtime, image, frames)
    result = runtime(image)
    syncs = host_syncs(runtime, image)
    summary = {
        "backend": runtime.backend,
        "load_and_warmup_s": round(ready_s, 2),
        "p50_ms": round(statistics.median(times), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "host_syncs_per_frame": len(syncs),
    }
    return summary, result.anomaly_map, syncs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_probe", description=description(__doc__)
    )
    parser.add_argument("--artifact", type=Path, required=True, help="artifact folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--frames", type=int, default=30, help="timed frames per backend")
    args = parser.parse_args(argv)
    setup_logging()
    if not torch.cuda.is_available():
        print("gpu_probe: needs a CUDA device; torch sees none", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    maps, listing = {}, []
    for backend in ("eager", "compile"):
        summary, maps[backend], syncs = probe(args.artifact, backend, args.frames)
        report[backend] = summary
        listing += [f"[{backend}] {line}" for line in syncs] or [f"[{backend}] no host syncs"]
        print(json.dumps(summary), flush=True)
    eager = maps["eager"]
    scale = float(eager.max() - eager.min()) or 1.0
    difference = float(np.abs(maps["compile"] - eager).max()) / scale
    report["compile_vs_eager_max_rel_diff"] = difference
    report["compile_equals_eager"] = difference <= TOLERANCE
    (args.out / "gpu_probe.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "host_syncs.txt").write_text("\n".join(listing) + "\n")
    print(f"compile vs eager: max relative difference {difference:.2e} (tolerance {TOLERANCE})")
    return 0 if report["compile_equals_eager"] else 1


if __name__ == "__main__":
    sys.exit(main())
