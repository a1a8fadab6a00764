"""A capture loop around ``engine.Runtime``: score every frame, draw the verdict, report latency.

    python -m tools.camera_loop --artifact artifacts/pushpins                 # camera 0
    python -m tools.camera_loop --artifact artifacts/pushpins --source clip.mp4 --out overlays/
    python -m tools.camera_loop --artifact artifacts/pushpins --source DIR --max-frames 20

When the source is a camera index and no camera opens, the loop falls back to ``--fallback``
(default: the synthetic test images of the artifact's category, when they are in the cache), so
the example runs on machines without a camera. ``--show`` opens an OpenCV window (q quits).
``--log FILE.jsonl|.csv`` keeps one record per frame (see :mod:`engine.records`);
``--threshold T`` replaces the artifact's calibrated threshold for this run.
Stream URLs (``rtsp://``, ``http://``) go to OpenCV as given. A source that cannot be opened, or
a live camera that stops delivering (after ``--reconnect N`` attempts), ends with a message on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine import overlay
from engine.artifact import ArtifactError
from engine.backends import BACKENDS
from engine.build import synthetic_root
from engine.cli import DEVICES, description, setup_logging
from engine.records import ResultLog, check_log_path
from engine.runtime import Result, Runtime, SourceLost

logger = logging.getLogger("tools.camera_loop")  # not __name__: "__main__" under -m


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_source(text: str) -> int | str | Path:
    """A camera index (int), a stream URL (kept a string: a Path would turn ``rtsp://h`` into
    ``rtsp:/h``), or a video file / image folder path."""
    if text.lstrip("-").isdigit():
        index = int(text)
        if index < 0:
            raise argparse.ArgumentTypeError(f"camera index must be >= 0, got {index}")
        return index
    return text if "://" in text else Path(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.camera_loop", description=description(__doc__)
    )
    parser.add_argument("--artifact", type=Path, required=True, help="engine.build artifact")
    parser.add_argument(
        "--source",
        type=parse_source,
        default=0,
        help="camera index, stream URL (rtsp://, http://), video file or image folder (default 0)",
    )
    parser.add_argument("--fallback", type=Path, help="video/folder to use when no camera opens")
    parser.add_argument("--out", type=Path, help="write overlay PNGs here")
    parser.add_argument(
        "--show",
        action="store_true",
        help="display overlays (needs a screen and OpenCV with GUI support: opencv-python)",
    )
    parser.add_argument(
        "--save-alarms",
        type=Path,
        metavar="DIR",
        help="keep the raw frame and its overlay of every anomalous frame here",
    )
    parser.add_argument(
        "--keep",
        type=non_negative_int,
        default=1000,
        help="with --save-alarms: how many alarms to keep, oldest deleted first (0: all)",
    )
    parser.add_argument(
        "--max-frames", type=non_negative_int, default=0, help="stop after N frames (0: all)"
    )
    parser.add_argument(
        "--latest",
        action="store_true",
        help="live cameras: score the newest frame, dropping those that arrived meanwhile",
    )
    parser.add_argument(
        "--reconnect",
        type=non_negative_int,
        default=0,
        help="reconnect attempts (with back-off) when a live camera stops delivering (default 0)",
    )
    parser.add_argument(
        "--log", type=Path, help="append a record per frame to FILE.jsonl or FILE.csv"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="decision threshold (default: the artifact's calibrated one)",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when present")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="see engine.backends (default auto)"
    )
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
    """The opened camera (handed to the stream, so it is opened once), a stream URL, or a
    video/folder path."""
    if not isinstance(args.source, int):
        return args.source
    capture = open_camera(args.source)
    if capture is not None:
        return capture
    fallback = args.fallback or synthetic_root() / category / "test" / "logical_anomalies"
    if not fallback.exists():
        raise ValueError(
            f"no camera at index {args.source} and no fallback at {fallback}; "
            "pass --source VIDEO|FOLDER"
        )
    logger.warning("no camera at index %s: using %s", args.source, fallback)
    return fallback


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        if args.show:
            check_gui()
        if args.log is not None:
            check_log_path(args.log, "--log")
        rt = Runtime.load(
            args.artifact, device=args.device, backend=args.backend, threshold=args.threshold
        )
    except (ArtifactError, ValueError, RuntimeError) as error:
        return _fail(error)
    source = None
    try:
        source = choose_source(args, rt.category)
        # The stream's default order: RGB for image folders, BGR (OpenCV) for everything else.
        color = "rgb" if isinstance(source, Path) and source.is_dir() else "bgr"
        for folder in (args.out, args.save_alarms):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        # Opens the source now, so that a bad one fails before the (possibly long) warm-up.
        frames = rt.stream(source, color=color, reconnect=args.reconnect, latest=args.latest)
    except (ValueError, RuntimeError, OSError) as error:
        _release(source)
        return _fail(error)
    latencies: list[float] = []
    alarms = 0
    try:
        logger.info("%s; warm-up %.1f ms", rt, rt.warmup())
        log = None if args.log is None else ResultLog(args.log, rt, args.source)
        with log or nullcontext():
            for result in _run(frames, args, color):
                latencies.append(result.latency_ms)
                alarms += result.is_anomalous
                if log is not None:
                    log.write(result)
    except SourceLost as error:
        hint = "" if args.reconnect else " (--reconnect N retries a lost camera)"
        return _fail(f"source {args.source}: {error}", hint)
    except OSError as error:  # writing an overlay: disk full, folder not writable
        return _fail(error)
    finally:
        frames.close()
        _release(source)
        _summary(latencies, alarms)
    return 0


def _fail(error: Exception | str, hint: str = "") -> int:
    print(f"error: {error}{hint}", file=sys.stderr)
    return 2


def _run(
    frames: Iterator[tuple[np.ndarray, Result]], args: argparse.Namespace, color: str
) -> Iterator[Result]:
    """Print, draw and save each result, then yield it; stops at ``--max-frames`` or on q."""
    for count, (frame, result) in enumerate(frames, start=1):
        verdict = "ANOMALY" if result.is_anomalous else "ok"
        print(
            f"frame {result.source_index:5d}  score {result.score:8.3f}  {verdict:7s}  "
            f"{result.latency_ms:7.1f} ms",
            flush=True,
        )
        keep_going = True
        alarm = args.save_alarms is not None and result.is_anomalous
        if args.out is not None or args.show or alarm:
            drawn = overlay(frame, result, color=color)
            rgb = drawn if color == "rgb" else drawn[..., ::-1]
            if args.out is not None:
                Image.fromarray(rgb).save(args.out / f"{result.source_index:05d}.png")
            if alarm:
                raw = frame if color == "rgb" else frame[..., ::-1]
                save_alarm(args.save_alarms, result, raw, rgb, args.keep)
            if args.show:
                keep_going = show(np.ascontiguousarray(rgb[..., ::-1]))
        yield result
        if not keep_going or (args.max_frames and count >= args.max_frames):
            return


def _summary(latencies: list[float], alarms: int) -> None:
    if latencies:
        lat = np.asarray(latencies)
        print(
            f"{len(lat)} frames, {alarms} anomalous; latency ms: median {np.median(lat):.1f}, "
            f"p95 {np.percentile(lat, 95):.1f}, max {lat.max():.1f}"
        )


def _release(source: Any) -> None:
    """Release a camera this tool opened (the stream leaves captures passed in to their owner)."""
    if source is not None and hasattr(source, "release"):
        source.release()


ALARM_NAME = re.compile(r"(\d{8}T\d{6}\.\d{6}Z_\d{6,})_raw\.png")


def save_alarm(folder: Path, result: Result, raw: np.ndarray, drawn: np.ndarray, keep: int) -> None:
    """Write an alarm's raw frame and overlay (RGB) as ``<UTC time>_<frame>_{raw,overlay}.png``,
    then delete the oldest alarms beyond ``keep`` (0: keep all)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    stem = f"{stamp}_{result.source_index:06d}"
    Image.fromarray(np.ascontiguousarray(raw)).save(folder / f"{stem}_raw.png")
    Image.fromarray(np.ascontiguousarray(drawn)).save(folder / f"{stem}_overlay.png")
    if keep:
        # Only files this tool names: anything else in the folder is the user's and stays.
        names = (ALARM_NAME.fullmatch(p.name) for p in folder.glob("*_raw.png"))
        stems = sorted({found[1] for found in names if found})
        for old in stems[:-keep]:
            for part in ("raw", "overlay"):
                (folder / f"{old}_{part}.png").unlink(missing_ok=True)


def check_gui() -> None:
    """Raise RuntimeError saying what to install when OpenCV cannot open a window here."""
    try:
        import cv2
    except ImportError:
        raise RuntimeError("--show needs OpenCV: pip install opencv-python") from None
    try:
        cv2.namedWindow("npgmf")
        cv2.destroyWindow("npgmf")
    except cv2.error as error:
        raise RuntimeError(
            "--show needs OpenCV with GUI support and a display; this OpenCV has none "
            "(opencv-python-headless, what the 'camera' extra installs, cannot open windows): "
            "pip install opencv-python, or drop --show and use --out / --save-alarms "
            f"({str(error).strip().splitlines()[-1]})"
        ) from None


def show(frame_bgr: np.ndarray) -> bool:
    import cv2

    cv2.imshow("npgmf", frame_bgr)
    return cv2.waitKey(1) & 0xFF != ord("q")


if __name__ == "__main__":
    sys.exit(main())
