"""A capture loop around ``engine.Runtime``: score every frame, draw the verdict, report latency.

    python -m tools.camera_loop --artifact artifacts/pushpins                 # camera 0
    python -m tools.camera_loop --artifact artifacts/pushpins --source clip.mp4 --out overlays/
    python -m tools.camera_loop --artifact artifacts/pushpins --source DIR --max-frames 20

When the source is a camera index and no camera opens, the loop falls back to ``--fallback``
(default: the synthetic test images of the artifact's category, when they are in the cache), so
the example runs on machines without a camera. ``--show`` opens an OpenCV window (q quits).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine import overlay
from engine.artifact import ArtifactError
from engine.build import synthetic_root
from engine.runtime import Runtime


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.camera_loop", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--artifact", type=Path, required=True, help="engine.build artifact")
    parser.add_argument(
        "--source", default="0", help="camera index, video file or image folder (default 0)"
    )
    parser.add_argument("--fallback", type=Path, help="video/folder to use when no camera opens")
    parser.add_argument("--out", type=Path, help="write overlay PNGs here")
    parser.add_argument("--show", action="store_true", help="display overlays (needs a screen)")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0: all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--backend", default="auto", help="auto | eager | compile")
    return parser.parse_args(argv)


def open_camera(index: int) -> Any | None:
    """An opened ``cv2.VideoCapture`` for camera ``index``, or None (no camera, no OpenCV)."""
    try:
        import cv2
    except ImportError:
        return None
    capture = cv2.VideoCapture(index)
    if capture.isOpened():
        return capture
    capture.release()
    return None


def choose_source(args: argparse.Namespace, category: str) -> Any:
    """The opened camera (handed to the stream, so it is opened once), or a video/folder path."""
    if not args.source.isdigit():
        return Path(args.source)
    index = int(args.source)
    capture = open_camera(index)
    if capture is not None:
        return capture
    fallback = args.fallback or synthetic_root() / category / "test" / "logical_anomalies"
    if not fallback.exists():
        raise ValueError(
            f"no camera at index {index} and no fallback at {fallback}; pass --source VIDEO|FOLDER"
        )
    print(f"no camera at index {index}: using {fallback}", flush=True)
    return fallback


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rt = Runtime.load(args.artifact, device=args.device, backend=args.backend)
        source = choose_source(args, rt.category)
        frames_iter = rt.stream(source)
    except (ArtifactError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{rt}; warm-up {rt.warmup():.1f} ms", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    color = "rgb" if isinstance(source, Path) and source.is_dir() else "bgr"  # stream's default
    latencies, alarms = [], 0
    for frame, result in frames_iter:
        verdict = "ANOMALY" if result.is_anomalous else "ok"
        print(
            f"frame {result.source_index:5d}  score {result.score:8.3f}  {verdict:7s}  "
            f"{result.latency_ms:7.1f} ms",
            flush=True,
        )
        latencies.append(result.latency_ms)
        alarms += result.is_anomalous
        if args.out is not None or args.show:
            drawn = overlay(frame, result, color=color)
            if args.out is not None:
                rgb = drawn if color == "rgb" else drawn[..., ::-1]
                Image.fromarray(rgb).save(args.out / f"{result.source_index:05d}.png")
            if args.show and not show(drawn):
                break
        if args.max_frames and len(latencies) >= args.max_frames:
            break
    if latencies:
        lat = np.asarray(latencies)
        print(
            f"{len(lat)} frames, {alarms} anomalous; latency ms: median {np.median(lat):.1f}, "
            f"p95 {np.percentile(lat, 95):.1f}, max {lat.max():.1f}"
        )
    return 0


def show(frame_bgr: np.ndarray) -> bool:
    import cv2

    cv2.imshow("npgmf", frame_bgr)
    return cv2.waitKey(1) & 0xFF != ord("q")


if __name__ == "__main__":
    sys.exit(main())
