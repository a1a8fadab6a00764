"""Dataset readers (MVTec LOCO AD, MVTec AD, a plain folder), image I/O, model-input transforms.

``open_dataset`` picks the reader from ``--data-format`` or, with ``auto``, from the folder
layout (:mod:`engine.data.formats`). The transforms live in ``engine.data.transforms`` and are
not imported here, so reading data does not import torch.
"""

from __future__ import annotations

from engine.data.folder import FolderDataset
from engine.data.formats import (
    DATA_FORMATS,
    CategoryDataset,
    evaluation_level,
    format_of,
    open_dataset,
)
from engine.data.loco import LocoDataset
from engine.data.mvtec import MVTecADDataset
from engine.data.types import DatasetError

__all__ = [
    "DATA_FORMATS",
    "CategoryDataset",
    "DatasetError",
    "FolderDataset",
    "LocoDataset",
    "MVTecADDataset",
    "evaluation_level",
    "format_of",
    "open_dataset",
]
