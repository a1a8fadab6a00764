"""Reader for the MVTec LOCO AD layout (``../shared/reference/loco_evaluation.md`` §1).

::

    <root>/<category>/
      train/good/NNN.png   validation/good/NNN.png
      test/{good,logical_anomalies,structural_anomalies}/NNN.png
      ground_truth/{logical_anomalies,structural_anomalies}/NNN/MMM.png   one PNG per channel
      defects_config.json

The whole layout is checked when the reader is built (directory listings and the JSON only; no
pixels are decoded), so a malformed folder fails before any training starts. Image counts are not
checked: the released files differ from the paper's table for splicing_connectors.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.data.images import check_mask_size, common_image_size, list_image_files, read_mask
from engine.data.types import (
    GOOD,
    LOCO_ANOMALY_TYPES,
    SPLITS,
    DatasetError,
    DefectSpec,
    GroundTruthChannel,
    Sample,
)

CONFIG_NAME = "defects_config.json"
_CONFIG_KEYS = frozenset(
    {"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"}
)
_SPLIT_FOLDERS = {
    "train": (GOOD,),
    "validation": (GOOD,),
    "test": (GOOD, *LOCO_ANOMALY_TYPES),
}


def parse_defects_config(path: Path) -> dict[int, DefectSpec]:
    """Parse ``defects_config.json`` with the official evaluator's type rules.

    Each entry needs ``defect_name`` (non-empty str), ``pixel_value`` (int 1..255, unique),
    ``relative_saturation`` (bool) and ``saturation_threshold``: a JSON float in (0, 1] when
    relative, a positive JSON int otherwise (``6300.0`` is refused, as the official parser does).

    Returns:
        The entries keyed by pixel value.
    """
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: must hold a non-empty JSON list of defect entries")

    defects: dict[int, DefectSpec] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} must be a JSON object, got {entry!r}")
        if set(entry) != _CONFIG_KEYS:
            raise DatasetError(
                f"{where} must have exactly the keys {sorted(_CONFIG_KEYS)}, got {sorted(entry)}"
            )
        name = entry["defect_name"]
        value = entry["pixel_value"]
        threshold = entry["saturation_threshold"]
        relative = entry["relative_saturation"]
        where = f"{where} ({name!r})"
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: defect_name must be a non-empty string")
        if type(value) is not int or not 1 <= value <= 255:
            raise DatasetError(f"{where}: pixel_value must be an int in 1..255, got {value!r}")
        if value in defects:
            raise DatasetError(
                f"{where}: pixel_value {value} is already used by {defects[value].name!r}"
            )
        if type(relative) is not bool:
            raise DatasetError(f"{where}: relative_saturation must be true or false")
        if relative and (type(threshold) is not float or not 0.0 < threshold <= 1.0):
            raise DatasetError(
                f"{where}: with relative_saturation true, saturation_threshold must be a float "
                f"in (0, 1], got {threshold!r}"
            )
        if not relative and (type(threshold) is not int or threshold < 1):
            raise DatasetError(
                f"{where}: with relative_saturation false, saturation_threshold must be a "
                f"positive int pixel count (no decimal point), got {threshold!r}"
            )
        defects[value] = DefectSpec(name, value, threshold, relative)
    return defects


def check_category_name(name: str) -> str:
    """Return ``name`` if it is a plain folder name, else raise DatasetError.

    Category names become paths under the data root and the artifact folder (``artifacts/<name>``)
    and are deleted/replaced there, so ``a/b``, ``..``, absolute paths and hidden names, which
    would reach other folders, are refused.
    """
    if not isinstance(name, str):
        raise DatasetError(f"a category name must be a string, got {name!r}")
    problem = None
    if not name:
        problem = "it is empty"
    elif any(sep in name for sep in ("/", "\\", "\0")):
        problem = "it contains a path separator"
    elif name.startswith("."):
        problem = "it starts with '.' (hidden, '.' or '..')"
    elif name != name.strip():
        problem = "it starts or ends with whitespace"
    if problem is not None:
        raise DatasetError(
            f"category {name!r} is not a plain folder name: {problem}; name one folder under "
            "the data root, e.g. --category pushpins"
        )
    return name


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing folder; {expected}")


class LocoDataset:
    """One category of a dataset in the MVTec LOCO AD layout.

    Args:
        root: the folder holding the category folders.
        category: the category folder name (any plain name, not limited to the five LOCO ones;
            see :func:`check_category_name`).

    Raises:
        DatasetError: a category that is not a plain folder name, a missing split folder, an unknown entry under ``ground_truth/``, a GT
            folder without its test image or the reverse, a GT folder without PNGs, or a
            malformed ``defects_config.json``. Hidden entries (``.DS_Store``...) are ignored.
    """

    def __init__(self, root: str | Path, category: str) -> None:
        self.root = Path(root)
        self.category = check_category_name(category)
        self.path = self.root / category
        if not self.path.is_dir():
            raise DatasetError(
                f"{self.path}: category folder not found; "
                f"categories under {self.root}: {list_categories(self.root)}"
            )
        self._check_layout()
        self.defects: dict[int, DefectSpec] = parse_defects_config(self.path / CONFIG_NAME)
        self._samples = {split: self._scan_split(split) for split in SPLITS}

    def _check_layout(self) -> None:
        expected = (
            "an MVTec LOCO AD category needs train/good, validation/good, test/good, "
            "test/logical_anomalies, test/structural_anomalies, "
            "ground_truth/{logical_anomalies,structural_anomalies} and defects_config.json"
        )
        for split, types in _SPLIT_FOLDERS.items():
            for defect_type in types:
                _require_dir(self.path / split / defect_type, expected)
        ground_truth = self.path / "ground_truth"
        for defect_type in LOCO_ANOMALY_TYPES:
            _require_dir(ground_truth / defect_type, expected)
        if not (self.path / CONFIG_NAME).is_file():
            raise DatasetError(f"{self.path / CONFIG_NAME}: missing file; {expected}")
        for entry in ground_truth.iterdir():
            if entry.name not in LOCO_ANOMALY_TYPES and not _is_hidden(entry):
                raise DatasetError(
                    f"{entry}: unexpected entry; ground_truth/ may only hold the folders "
                    f"{', '.join(LOCO_ANOMALY_TYPES)}"
                )

    def _scan_split(self, split: str) -> list[Sample]:
        samples = []
        for defect_type in _SPLIT_FOLDERS[split]:
            folder = self.path / split / defect_type
            images = list_image_files(folder)
            if not images and defect_type == GOOD:
                raise DatasetError(f"{folder}: no images; {split}/good must not be empty")
            if defect_type == GOOD:
                samples += [Sample(self.category, split, GOOD, image) for image in images]
            else:
                samples += self._pair_ground_truth(split, defect_type, images)
        return samples

    def _pair_ground_truth(self, split: str, defect_type: str, images: list[Path]) -> list[Sample]:
        """Attach each anomalous image's GT PNGs; every GT folder must belong to an image."""
        gt_root = self.path / "ground_truth" / defect_type
        gt_folders = {}
        for entry in sorted(gt_root.iterdir()):
            if _is_hidden(entry):
                continue
            if not entry.is_dir():
                raise DatasetError(
                    f"{entry}: unexpected file; {gt_root} must hold one folder per test image"
                )
            gt_folders[entry.name] = entry
        stems = {image.stem: image for image in images}
        for name, folder in gt_folders.items():
            if name not in stems:
                raise DatasetError(
                    f"{folder}: ground-truth folder without its test image "
                    f"{self.path / split / defect_type / name}.png"
                )

        samples = []
        for image in images:
            folder = gt_folders.get(image.stem)
            if folder is None:
                raise DatasetError(
                    f"{image}: anomalous test image without ground truth; "
                    f"expected the folder {gt_root / image.stem} with one PNG per defect"
                )
            masks = []
            for entry in sorted(folder.iterdir()):
                if _is_hidden(entry):
                    continue
                if entry.suffix.lower() != ".png" or not entry.is_file():
                    raise DatasetError(f"{entry}: unexpected entry; {folder} must hold only PNGs")
                masks.append(entry)
            if not masks:
                raise DatasetError(f"{folder}: ground-truth folder holds no PNG for {image}")
            samples.append(Sample(self.category, split, defect_type, image, tuple(masks)))
        return samples

    def samples(self, split: str) -> list[Sample]:
        """The samples of ``split`` (``train``, ``validation`` or ``test``).

        Test samples are ordered good, logical_anomalies, structural_anomalies, then by name.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._samples[split])

    def ground_truth(self, sample: Sample) -> list[GroundTruthChannel]:
        """Read the GT channels of ``sample`` (empty for good images), with their DefectSpec.

        Raises:
            DatasetError: a malformed mask, a pixel value missing from ``defects_config.json``,
                or a mask whose size differs from the image's.
        """
        if not sample.mask_paths:
            return []
        channels = []
        for mask_path in sample.mask_paths:
            mask, value = read_mask(mask_path)
            if value not in self.defects:
                raise DatasetError(
                    f"{mask_path}: pixel value {value} has no entry in "
                    f"{self.path / CONFIG_NAME} (known: {sorted(self.defects)})"
                )
            check_mask_size(mask, mask_path, sample.image_path)
            channels.append(GroundTruthChannel(mask, self.defects[value]))
        return channels

    def image_size(self, split: str | None = None) -> tuple[int, int]:
        """(height, width) shared by the images of ``split`` (all splits when None).

        Reads PNG headers only. The official evaluator requires one size per category.
        """
        splits = SPLITS if split is None else (split,)
        return common_image_size(
            sample.image_path for name in splits for sample in self.samples(name)
        )


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that look like LOCO categories.

    Hidden folders (e.g. a generator's half-written ``.name.partial-*``) are skipped. A category
    folder holds ``train/``, ``validation/``, ``test/`` and ``defects_config.json``;
    the full layout is only checked when a :class:`LocoDataset` is built on it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root folder not found")
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir()
        and not _is_hidden(entry)
        and (entry / CONFIG_NAME).is_file()
        and all((entry / split).is_dir() for split in SPLITS)
    )
