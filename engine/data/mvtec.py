"""Reader for the MVTec AD layout.

::

    <root>/<category>/
      train/good/NNN.png
      test/good/NNN.png   test/<defect>/NNN.png
      ground_truth/<defect>/NNN_mask.png      binary 0/255, one per anomalous test image

MVTec AD has no validation split. Calibration needs one, so a deterministic fraction of
``train/good`` (at least two images) is held out: images at evenly spaced positions of the
name-sorted list (spread over the capture sequence rather than its tail), never used for
training.
"""

from __future__ import annotations

from pathlib import Path

from engine.data.images import list_image_files
from engine.data.loco import check_category_name
from engine.data.splits import ListedSplits
from engine.data.types import (
    GOOD,
    MIN_VALIDATION_IMAGES,
    DatasetError,
    DefectSpec,
    Sample,
)

MASK_SUFFIX = "_mask"


def holdout_indices(count: int, fraction: float, minimum: int = 1) -> list[int]:
    """Evenly spaced positions of ``round(fraction * count)`` of ``count`` items.

    At least ``minimum`` positions and at most ``count - 1``, so both sides of the split are
    non-empty when ``count >= 2``.
    """
    n_holdout = min(count - 1, max(minimum, round(fraction * count)))
    return sorted({int((i + 0.5) * count / n_holdout) for i in range(n_holdout)})


class MVTecADDataset(ListedSplits):
    """One category of a dataset in the MVTec AD layout; same interface as ``LocoDataset``.

    Args:
        root: the folder holding the category folders.
        category: the category folder name (a plain name, see ``check_category_name``).
        validation_fraction: share of ``train/good`` held out as the ``validation`` split, in
            (0, 1); at least two images are held out and at least one is kept for training.

    ``defects`` is empty (no saturation config); GT channels carry ``defect=None``. The test
    split holds the good images first, then the defect folders by name.
    """

    def __init__(self, root: str | Path, category: str, validation_fraction: float = 0.1) -> None:
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        self.root = Path(root)
        self.category = check_category_name(category)
        self.path = self.root / category
        self.validation_fraction = validation_fraction
        self.defects: dict[int, DefectSpec] = {}
        expected = (
            "an MVTec AD category needs train/good, test/<defect>/ and ground_truth/<defect>/"
        )
        if not self.path.is_dir():
            raise DatasetError(f"{self.path}: category folder not found; {expected}")
        for folder in ("train/good", "test/good", "ground_truth"):
            if not (self.path / folder).is_dir():
                raise DatasetError(f"{self.path / folder}: missing folder; {expected}")
        train, validation = self._split_train()
        self._samples = {"train": train, "validation": validation, "test": self._scan_test()}

    def _split_train(self) -> tuple[list[Sample], list[Sample]]:
        folder = self.path / "train" / GOOD
        images = list_image_files(folder)
        if len(images) <= MIN_VALIDATION_IMAGES:
            raise DatasetError(
                f"{folder}: {len(images)} image(s); at least {MIN_VALIDATION_IMAGES + 1} are "
                f"needed to hold out {MIN_VALIDATION_IMAGES} for validation and train on the rest"
            )
        held_out = set(
            holdout_indices(len(images), self.validation_fraction, MIN_VALIDATION_IMAGES)
        )
        train, validation = [], []
        for index, image in enumerate(images):
            if index in held_out:
                validation.append(Sample(self.category, "validation", GOOD, image))
            else:
                train.append(Sample(self.category, "train", GOOD, image))
        return train, validation

    def _scan_test(self) -> list[Sample]:
        test_root = self.path / "test"
        defect_types = sorted(
            entry.name
            for entry in test_root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and entry.name != GOOD
        )
        gt_root = self.path / "ground_truth"
        for entry in sorted(gt_root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.name not in defect_types or not entry.is_dir():
                raise DatasetError(
                    f"{entry}: unexpected entry; ground_truth/ may only hold folders named "
                    f"like the defect folders of test/ ({defect_types})"
                )
        samples = [
            Sample(self.category, "test", GOOD, p) for p in list_image_files(test_root / GOOD)
        ]
        for defect_type in defect_types:
            samples += self._pair_masks(defect_type)
        return samples

    def _pair_masks(self, defect_type: str) -> list[Sample]:
        """Each ``test/<defect>/NNN.*`` needs ``ground_truth/<defect>/NNN_mask.png`` and back."""
        gt_folder = self.path / "ground_truth" / defect_type
        if not gt_folder.is_dir():
            raise DatasetError(f"{gt_folder}: missing ground-truth folder for test/{defect_type}")
        masks = {}
        for mask in list_image_files(gt_folder):
            if not mask.stem.endswith(MASK_SUFFIX):
                raise DatasetError(f"{mask}: ground-truth file names must end in '_mask.png'")
            masks[mask.stem.removesuffix(MASK_SUFFIX)] = mask
        images = list_image_files(self.path / "test" / defect_type)
        stems = {image.stem for image in images}
        for stem, mask in masks.items():
            if stem not in stems:
                raise DatasetError(f"{mask}: ground-truth mask without its test image")
        samples = []
        for image in images:
            if image.stem not in masks:
                raise DatasetError(
                    f"{image}: anomalous test image without ground truth; expected "
                    f"{gt_folder / (image.stem + MASK_SUFFIX)}.png"
                )
            samples.append(Sample(self.category, "test", defect_type, image, (masks[image.stem],)))
        return samples
