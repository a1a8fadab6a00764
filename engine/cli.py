"""What every command-line tool shares: the device choices and help text from docstrings."""

from __future__ import annotations

import logging

DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when torch sees one, else CPU


def description(doc: str | None) -> str:
    """The first paragraph of a module docstring as argparse help: no reST double backticks."""
    return (doc or "").strip().split("\n\n")[0].replace("``", "")


# The project's logger namespaces. A CLI module names its logger itself ("tools.predict"):
# run as ``python -m``, its __name__ is "__main__", outside them.
LOGGERS = ("engine", "tools")


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped, levelled log lines on stderr for the project's messages (reconnects, skipped
    frames, exports) at ``level``, other libraries' from WARNING; results stay on stdout."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)
