"""Write synthetic LOCO-style categories and their contact sheets.

    python -m tools.make_synthetic --out data/synthetic [--category NAME|all] [--seed N]
        [--size WxH] [--n-train N] [--n-validation N] [--n-test N] [--overwrite]

``--n-test`` sets the number of good, logical and structural test images alike. Bad arguments
and failed writes (a file in the way, no permission, disk full) exit with code 2 and a message.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence

from engine.cli import description
from engine.data.synthetic import CATEGORIES, generate_category, get_category
from engine.data.synthetic.contact_sheet import contact_sheet

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"size must be WxH with positive ints, got {text!r}")
    return int(match[1]), int(match[2])


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.make_synthetic", description=description(__doc__)
    )
    parser.add_argument("--out", required=True, help="output root; categories go below it")
    parser.add_argument("--category", default="all", choices=[*CATEGORIES, "all"])
    parser.add_argument("--seed", type=_count, default=0)
    parser.add_argument("--size", type=_size, default=None, help="WxH (default: per category)")
    parser.add_argument("--n-train", type=_count, default=60)
    parser.add_argument("--n-validation", type=_count, default=16)
    parser.add_argument("--n-test", type=_count, default=20, help="per test folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing categories")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        write_categories(parser, args)
    except KeyboardInterrupt:
        print("\ninterrupted: the category in progress was not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def write_categories(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Generate each asked-for category and its contact sheet, printing a summary line each."""
    names = list(CATEGORIES) if args.category == "all" else [args.category]
    for name in names:
        start = time.perf_counter()
        try:
            folder = generate_category(
                args.out,
                name,
                seed=args.seed,
                size=args.size,
                n_train=args.n_train,
                n_validation=args.n_validation,
                n_test_good=args.n_test,
                n_logical=args.n_test,
                n_structural=args.n_test,
                progress=not args.no_progress,
                overwrite=args.overwrite,
            )
        except (ValueError, FileExistsError) as err:
            parser.error(str(err))  # exits 2 with the usage line
        if args.n_test > 0:
            contact_sheet(folder, folder / "contact_sheet.png")
        w, h = args.size or get_category(name).design_size
        print(
            f"{name}: train {args.n_train}, validation {args.n_validation}, test "
            f"{args.n_test} good / {args.n_test} logical / {args.n_test} structural, {w}x{h}, "
            f"{time.perf_counter() - start:.1f} s -> {folder}"
        )


if __name__ == "__main__":
    sys.exit(main())
