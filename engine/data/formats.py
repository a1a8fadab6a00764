"""The data formats a build reads, how ``auto`` tells them apart, and what each can evaluate.

=========  ================================================================================
format     layout of ``<root>/<category>/``
=========  ================================================================================
``loco``   MVTec LOCO AD: train/, validation/, test/, ground_truth/, defects_config.json
``mvtec``  MVTec AD: train/good, test/<defect>/, ground_truth/<defect>/NNN_mask.png
``folder`` good/ [validation/] [bad/] [masks/] (:mod:`engine.data.folder`)
=========  ================================================================================

What a test split can measure is decided from the data alone, before any training
(:func:`evaluation_level`): LOCO metrics, pixel-level (masks), image-level (anomalous images
without masks) or nothing (no anomalous test image).
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.data.folder import BAD, GOOD_FOLDER, MASKS_FOLDER, FolderDataset
from engine.data.loco import CONFIG_NAME, LocoDataset, check_category_name
from engine.data.mvtec import MVTecADDataset
from engine.data.types import DatasetError

log = logging.getLogger(__name__)

CategoryDataset = LocoDataset | MVTecADDataset | FolderDataset

READERS: dict[str, type[CategoryDataset]] = {
    "loco": LocoDataset,
    "mvtec": MVTecADDataset,
    "folder": FolderDataset,
}
DATA_FORMATS = ("auto", *READERS)
FORMAT_NAMES = {"loco": "MVTec LOCO AD", "mvtec": "MVTec AD", "folder": "folder"}
_EXPECTED = (
    "expected one of: folder (good/, optional validation/, bad/, masks/); MVTec LOCO AD "
    f"(train/, validation/, test/, ground_truth/, {CONFIG_NAME}); MVTec AD (train/, test/, "
    "ground_truth/)"
)

NO_METRICS, IMAGE_LEVEL, PIXEL_LEVEL, LOCO_LEVEL = "none", "image", "pixel", "loco"
EVALUATIONS = {
    NO_METRICS: "no test metrics",
    IMAGE_LEVEL: "image level: image AUROC, and false alarms and recall at the threshold",
    PIXEL_LEVEL: "pixel level: image AUROC, pixel AUROC and AU-PRO@0.3 (exact MVTec AD PRO), "
    "and false alarms and recall at the threshold",
    LOCO_LEVEL: "MVTec LOCO: image AUROC and AU-sPRO@0.05 (logical / structural / mean), and "
    "false alarms and recall at the threshold",
}


def detect_format(path: Path) -> str | None:
    """The format whose layout the category folder ``path`` has, or None.

    ``good/`` at the top means a folder category (neither MVTec layout has one there); a
    ``defects_config.json`` or ``validation/`` beside ``train/`` means LOCO; ``train/`` and
    ``test/`` without them mean MVTec AD.
    """
    if (path / GOOD_FOLDER).is_dir():
        return "folder"
    if (path / CONFIG_NAME).is_file() or all(
        (path / name).is_dir() for name in ("train", "validation")
    ):
        return "loco"
    if all((path / name).is_dir() for name in ("train", "test")):
        return "mvtec"
    return None


def resolve_format(root: str | Path, category: str, data_format: str = "auto") -> str:
    """``data_format``, or with ``auto`` the format detected in ``<root>/<category>``, logged.

    Raises:
        DatasetError: the category folder is missing, or ``auto`` finds no known layout (the
            message names the folder, what it holds and what each format needs).
        ValueError: an unknown ``data_format``.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {DATA_FORMATS}")
    path = Path(root) / check_category_name(category)
    if not path.is_dir():
        parent = Path(root)
        found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise DatasetError(f"{path}: category folder not found (folders in {parent}: {found})")
    if data_format != "auto":
        log.info("%s: reading the %s layout (--data-format)", path, FORMAT_NAMES[data_format])
        return data_format
    detected = detect_format(path)
    if detected is None:
        entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        raise DatasetError(
            f"{path}: no known data layout (it holds {entries}); {_EXPECTED}; or name the "
            "format with --data-format"
        )
    log.info("%s: detected the %s layout (--data-format auto)", path, FORMAT_NAMES[detected])
    return detected


def open_dataset(root: str | Path, category: str, data_format: str = "auto") -> CategoryDataset:
    """Open ``<root>/<category>`` with the reader of ``data_format`` (``auto``: detected).

    Raises:
        DatasetError: see :func:`resolve_format` and the readers.
    """
    return READERS[resolve_format(root, category, data_format)](root, category)


def format_of(dataset: CategoryDataset) -> str:
    """The format name (``loco``, ``mvtec`` or ``folder``) of an opened dataset."""
    return next(name for name, reader in READERS.items() if isinstance(dataset, reader))


def list_categories(root: str | Path, data_format: str = "auto") -> list[str]:
    """Sorted names of the sub-folders of ``root`` in ``data_format``'s layout (any known one
    for ``auto``); hidden folders are skipped. Layouts are only fully checked when opened."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root folder not found")
    found = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            detected = detect_format(entry)
            if detected is not None and data_format in ("auto", detected):
                found.append(entry.name)
    return found


def evaluation_level(dataset: CategoryDataset) -> str:
    """What the test split can measure: ``loco``, ``pixel``, ``image`` or ``none``.

    ``none`` without anomalous test images; ``pixel`` when they have masks, ``image`` when they
    have none (the readers allow no mix); ``loco`` for an MVTec LOCO AD category.
    """
    anomalous = [sample for sample in dataset.samples("test") if sample.label]
    if not anomalous:
        return NO_METRICS
    if isinstance(dataset, LocoDataset):
        return LOCO_LEVEL
    return PIXEL_LEVEL if anomalous[0].mask_paths else IMAGE_LEVEL


def evaluation_plan(dataset: CategoryDataset) -> str:
    """One line for the build's log: the test split, the metrics it allows, and what would allow
    more."""
    level = evaluation_level(dataset)
    test = dataset.samples("test")
    bad = sum(sample.label for sample in test)
    line = f"test: {len(test) - bad} good, {bad} anomalous images; metrics: {EVALUATIONS[level]}"
    if isinstance(dataset, FolderDataset) and level == NO_METRICS:
        line += f" (add images of bad parts to {dataset.path / BAD} for image-level metrics)"
    elif isinstance(dataset, FolderDataset) and level == IMAGE_LEVEL:
        line += f" (add their masks to {dataset.path / MASKS_FOLDER} for pixel-level metrics)"
    return line


__all__ = [
    "DATA_FORMATS",
    "EVALUATIONS",
    "IMAGE_LEVEL",
    "LOCO_LEVEL",
    "NO_METRICS",
    "PIXEL_LEVEL",
    "CategoryDataset",
    "detect_format",
    "evaluation_level",
    "evaluation_plan",
    "format_of",
    "list_categories",
    "open_dataset",
    "resolve_format",
]
