"""Change an artifact's decision threshold without rebuilding it.

    python -m tools.threshold --artifact artifacts/pushpins --target-far 0.01
    python -m tools.threshold --artifact artifacts/pushpins --target-far 0.01 --good line3/good/
    python -m tools.threshold --artifact artifacts/pushpins --threshold 7.5

``--target-far R``: the threshold that rejects at most a share R of good images, from the
validation scores stored at build time or, with ``--good DIR``, from new images of good parts
scored now. ``--threshold T`` sets it directly. Only the threshold (and the manifest's checksum)
changes; the artifact is rewritten atomically. Exit 2 on bad input, with the artifact untouched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.artifact import ArtifactError, read_manifest
from engine.calibrate import calibrate_threshold
from engine.cli import DEVICES, description, setup_logging
from engine.data.images import list_image_files, read_rgb
from engine.data.types import DatasetError
from engine.operating_point import false_alarm_rate, set_threshold


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.threshold", description=description(__doc__)
    )
    parser.add_argument("--artifact", type=Path, required=True, help="engine.build artifact")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--target-far", type=float, help="share of good parts the threshold may reject, [0, 1)"
    )
    choice.add_argument("--threshold", type=float, help="the threshold itself (score units)")
    parser.add_argument(
        "--good", type=Path, help="folder of good-part images to calibrate on (with --target-far)"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="for scoring --good")
    args = parser.parse_args(argv)
    if args.good is not None and args.target_far is None:
        parser.error("--good needs --target-far")
    return args


def good_scores(args: argparse.Namespace, manifest: dict) -> tuple[np.ndarray, str]:
    """The good-image scores to calibrate on, and where they come from."""
    if args.good is None:
        return np.asarray(manifest["validation_scores"], dtype=np.float64), "validation"
    from engine import Runtime

    images = list_image_files(args.good)
    if not images:
        raise DatasetError(f"{args.good}: no images")
    runtime = Runtime.load(args.artifact, device=args.device)
    scores = [runtime(read_rgb(path), color="rgb").score for path in images]
    return np.asarray(scores), str(args.good)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        # Sealed, so its scores and threshold are the build's; set_threshold hashes the files.
        manifest = read_manifest(args.artifact, verify=False)
        scores, origin = good_scores(args, manifest)
        if args.threshold is not None:
            threshold = args.threshold
        else:
            threshold = calibrate_threshold(scores, args.target_far)
        old = manifest["threshold"]
        set_threshold(args.artifact, threshold)
    except (ArtifactError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.artifact}: threshold {old:.6g} -> {threshold:.6g}")
    print(
        f"on {scores.size} {origin} good images it rejects "
        f"{false_alarm_rate(scores, old):.1%} before, {false_alarm_rate(scores, threshold):.1%} now"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
