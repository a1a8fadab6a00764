"""Dataset readers (MVTec LOCO AD, MVTec AD), image I/O, model-input transforms.

``open_dataset`` picks the reader from the folder layout. The transforms live in
``engine.data.transforms`` and are not imported here, so reading data does not import torch.
"""

from __future__ import annotations

from pathlib import Path

from engine.data.loco import CONFIG_NAME, LocoDataset
from engine.data.mvtec import MVTecADDataset
from engine.data.types import DatasetError

CategoryDataset = LocoDataset | MVTecADDataset


def open_dataset(root: str | Path, category: str) -> CategoryDataset:
    """Open ``<root>/<category>`` with the reader its layout calls for.

    MVTec LOCO AD is recognised by ``defects_config.json`` or a ``validation/`` folder, MVTec AD by
    ``train/``, ``test/`` and ``ground_truth/`` without them.

    Raises:
        DatasetError: the folder is missing, is neither layout, or is malformed.
    """
    path = Path(root) / category
    if not path.is_dir():
        parent = Path(root)
        found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise DatasetError(f"{path}: category folder not found (folders in {parent}: {found})")
    if (path / CONFIG_NAME).exists() or (path / "validation").exists():
        return LocoDataset(root, category)
    if all((path / name).is_dir() for name in ("train", "test", "ground_truth")):
        return MVTecADDataset(root, category)
    raise DatasetError(
        f"{path}: neither an MVTec LOCO AD category (train/, validation/, test/, ground_truth/, "
        "defects_config.json) nor an MVTec AD category (train/, test/, ground_truth/)"
    )


__all__ = ["CategoryDataset", "DatasetError", "LocoDataset", "MVTecADDataset", "open_dataset"]
