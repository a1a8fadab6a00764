"""Score a folder of images offline with an artifact and write one record per image.

    python -m tools.predict --artifact artifacts/pushpins --input line3/2026-11-30/ --out scores.csv

Rows (CSV or JSON lines, by the suffix of ``--out``; see :mod:`engine.records`): time, image
file, index, score, threshold, verdict, latency, artifact sha256. Unreadable images are
reported and skipped; the exit code is 2 when any was skipped or the input is bad, else 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from engine.artifact import ArtifactError
from engine.cli import DEVICES, description, setup_logging
from engine.data.images import list_image_files, read_rgb
from engine.data.types import DatasetError
from engine.records import ResultLog, check_log_path

logger = logging.getLogger("tools.predict")  # not __name__: "__main__" under -m


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.predict", description=description(__doc__)
    )
    parser.add_argument("--artifact", type=Path, required=True, help="engine.build artifact")
    parser.add_argument("--input", type=Path, required=True, help="folder of images to score")
    parser.add_argument("--out", type=Path, required=True, help="records file: .csv or .jsonl")
    parser.add_argument("--threshold", type=float, help="decision threshold (default: calibrated)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="inference device")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    skipped = 0
    try:
        check_log_path(args.out, "--out")
        images = list_image_files(args.input) if args.input.is_dir() else None
        if not images:
            raise DatasetError(f"--input {args.input}: not a folder of images")
        from engine import Runtime

        runtime = Runtime.load(args.artifact, device=args.device, threshold=args.threshold)
        anomalous = 0
        with ResultLog(args.out, runtime) as log:
            for index, path in enumerate(tqdm(images, unit="img", disable=args.no_progress)):
                try:
                    image = read_rgb(path)
                except DatasetError as error:
                    logger.warning("skipped: %s", error)
                    skipped += 1
                    continue
                result = runtime(image, color="rgb")
                result.source_index = index
                anomalous += log.write(result, source=path)["verdict"] == "anomalous"
    except (ArtifactError, ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scored = len(images) - skipped
    print(f"{scored} images scored, {anomalous} anomalous, {skipped} skipped -> {args.out}")
    return 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
