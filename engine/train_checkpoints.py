"""Checkpoint files of the logical training: atomic writes, reading, resume checks, cleanup.

``last.pt`` holds everything a resume needs, ``best.pt`` the decoder of the best validation
epoch (see :mod:`engine.train`). Both are written to a temporary file and moved into place
with ``os.replace``, so an interruption at any moment leaves the previous complete file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from engine.atomic import atomic_file

CHECKPOINT_FORMAT = 3  # 2: adds the input fingerprint; 3: the per-epoch diagnostics
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
# atomic_save's temporary files: ".last.pt.<random>.tmp" (left behind only by a hard kill).
_CHECKPOINT_TEMP = re.compile(r"\.(last|best)\.pt\..+\.tmp")
START_FRESH = (
    "rerun `python -m engine.build` with --fresh to discard the checkpoints and train from the "
    "first epoch"
)
# May change between a run and its resume: they do not alter the trajectory of the epochs run.
RESUME_EXEMPT = ("epochs", "steps", "early_stop_patience", "num_workers")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` replacing ``path`` in one step (:func:`engine.atomic.atomic_file`); makes
    its folder first if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of this format, read with ``weights_only``; ValueError naming ``--fresh``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"checkpoint {path} cannot be read (truncated or corrupt: {error}); {START_FRESH}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} is not a format-{CHECKPOINT_FORMAT} logical checkpoint "
            f"(written by another engine version?); {START_FRESH}"
        )
    return state


def check_checkpoint_dir(path: str | Path) -> None:
    """Raise ValueError unless ``path`` is absent or a folder holding only checkpoint files.

    The build reuses (resumes from) and finally deletes this folder, so a folder it did not
    create (a symlink, a file, or any other entry inside) must never be taken for one.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise ValueError(
            f"{path}: exists and is not a checkpoint folder the engine created; the build keeps "
            "its training checkpoints there, so move it away or choose another --out"
        )
    foreign = sorted(entry.name for entry in path.iterdir() if not _is_checkpoint_file(entry))
    if foreign:
        raise ValueError(
            f"{path}: holds {foreign[:5]}, which the engine did not write; it only reuses or "
            "deletes a checkpoint folder that holds nothing but last.pt, best.pt and their "
            "temporary files, so move those away or choose another --out"
        )


def _is_checkpoint_file(entry: Path) -> bool:
    named = entry.name in (LAST_CHECKPOINT, BEST_CHECKPOINT)
    return (named or _CHECKPOINT_TEMP.fullmatch(entry.name) is not None) and (
        entry.is_file() and not entry.is_symlink()
    )


def discard_checkpoints(path: str | Path) -> None:
    """Delete the checkpoint files in ``path``, then the folder when nothing else is left.

    Only files :func:`engine.train.train_logical` writes are deleted; anything else stays where it is.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return
    for entry in path.iterdir():
        if _is_checkpoint_file(entry):
            entry.unlink()
    if not any(path.iterdir()):
        path.rmdir()


def check_resumable(
    state: dict[str, Any],
    path: Path,
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
    inputs: dict[str, str],
) -> None:
    """Raise ValueError, saying what differs and how to start over, unless ``state`` (a
    ``last.pt``) was written with these configs and inputs."""
    saved_inputs = state.get("fingerprint")
    saved_model, saved_train = state.get("model_config"), state.get("train_config")
    if not all(isinstance(v, dict) for v in (saved_inputs, saved_model, saved_train)):
        raise ValueError(f"checkpoint {path} lacks its configs or fingerprint; {START_FRESH}")
    changed = sorted(
        k for k in set(saved_inputs) | set(inputs) if saved_inputs.get(k) != inputs.get(k)
    )
    problems = [f"the {name} changed" for name in changed]
    problems += _config_mismatch(saved_model, model_cfg)
    problems += _config_mismatch(saved_train, train_cfg, RESUME_EXEMPT)
    if problems:
        raise ValueError(
            f"checkpoint {path} was written for other inputs or settings "
            f"({'; '.join(problems)}); resuming would mix two trainings. {START_FRESH}, "
            "or restore the data and settings of the interrupted run to resume it"
        )


def load_best(path: Path) -> dict[str, torch.Tensor]:
    """The decoder weights of ``best.pt``."""
    state = load_checkpoint(path)
    if not isinstance(state.get("decoder"), dict):
        raise ValueError(f"checkpoint {path} has no decoder weights; {START_FRESH}")
    return state["decoder"]


def _config_mismatch(saved: dict[str, Any], current: dict[str, Any], exempt=()) -> list[str]:
    keys = (set(saved) | set(current)) - set(exempt)
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
        for k in sorted(keys)
        if _plain(saved.get(k)) != _plain(current.get(k))
    ]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def check_storable(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` holds only what ``last.pt`` (loaded with
    ``weights_only``) and the JSON manifest both store: a failure at resume would come late."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            check_storable(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_storable(item, f"{where}[{i}]")
    elif value is not None and type(value) not in (bool, int, float, str):
        raise TypeError(
            f"{where} is a {type(value).__name__}; only str, int, float, bool, None, lists "
            "and dicts of them can be stored"
        )
