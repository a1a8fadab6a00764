"""Reader for a plain folder of one part's images: what a line engineer has.

::

    <root>/<category>/
      good/            images of good parts (required, not empty)
      validation/      optional: good images for calibration only
      bad/             optional: images of bad parts
      masks/           optional: one mask per bad image, bad/x.png <-> masks/x.png or x_mask.png

The splits are carved out of ``good/`` deterministically (:func:`holdout_indices`, evenly spaced
positions of the name-sorted list, so neither share is the tail of a capture session):

- ``test``: only when ``bad/`` holds images: the bad images plus ``TEST_FRACTION`` of ``good/``,
  which is neither trained on nor used for calibration (the false-alarm rate is measured on it);
- ``validation``: ``validation/`` when it exists, else ``VALIDATION_FRACTION`` of what is left of
  ``good/`` (at least two images): the branch statistics and the threshold are fitted on it;
- ``train``: the rest of ``good/``.

Without ``bad/`` there is nothing to test against; without ``masks/`` only image-level metrics
exist. With ``masks/`` every bad image needs exactly one mask (0 and one positive value, the
image's size) and every mask its bad image.
"""

from __future__ import annotations

from pathlib import Path

from engine.data.images import list_image_files
from engine.data.loco import check_category_name
from engine.data.mvtec import MASK_SUFFIX, holdout_indices
from engine.data.splits import ListedSplits
from engine.data.types import (
    GOOD,
    MIN_VALIDATION_IMAGES,
    DatasetError,
    DefectSpec,
    Sample,
)

GOOD_FOLDER = GOOD
VALIDATION_FOLDER = "validation"
BAD = "bad"
MASKS_FOLDER = "masks"
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2

LAYOUT = (
    "a folder category needs good/ (images of good parts) and may hold validation/, bad/ and "
    "masks/ (masks/x.png or masks/x_mask.png for bad/x.png)"
)


class FolderDataset(ListedSplits):
    """One category in the folder layout; same interface as ``LocoDataset``.

    Args:
        root: the folder holding the category folders.
        category: the category folder name (a plain name, see ``check_category_name``).

    ``defects`` is empty (no saturation config); bad images have the defect type ``bad``, their
    GT channels ``defect=None``. The test split holds the held-out good images first, then the
    bad ones.

    Raises:
        DatasetError: a missing or empty ``good/``, too few good images for the splits, a
            folder holding something other than images, a bad image without its mask (when
            ``masks/`` exists), a mask without its bad image, or two masks for one image.
    """

    def __init__(self, root: str | Path, category: str) -> None:
        self.root = Path(root)
        self.category = check_category_name(category)
        self.path = self.root / category
        self.defects: dict[int, DefectSpec] = {}
        if not self.path.is_dir():
            raise DatasetError(f"{self.path}: category folder not found; {LAYOUT}")
        good_folder = self.path / GOOD_FOLDER
        if not good_folder.is_dir():
            raise DatasetError(f"{good_folder}: missing folder; {LAYOUT}")
        good = list_image_files(good_folder)
        if not good:
            raise DatasetError(f"{good_folder}: no images; {LAYOUT}")
        bad = self._bad_samples()
        validation_folder = self.path / VALIDATION_FOLDER
        validation = list_image_files(validation_folder) if validation_folder.is_dir() else None
        if validation is not None and not validation:
            raise DatasetError(f"{validation_folder}: no images; remove it or add good images")
        train, held_validation, test_good = self._split_good(good, bool(bad), validation is None)
        self._samples = {
            "train": [Sample(self.category, "train", GOOD, p) for p in train],
            "validation": [
                Sample(self.category, "validation", GOOD, p) for p in validation or held_validation
            ],
            "test": [Sample(self.category, "test", GOOD, p) for p in test_good] + bad,
        }

    def _split_good(
        self, good: list[Path], hold_test: bool, hold_validation: bool
    ) -> tuple[list[Path], list[Path], list[Path]]:
        """(train, validation, test) images of ``good/``; see the module docstring."""
        needed = 1 + hold_test + MIN_VALIDATION_IMAGES * hold_validation
        if len(good) < needed:
            shares = ["1 for training"] + ["1 for testing"] * hold_test
            shares += [f"{MIN_VALIDATION_IMAGES} for validation"] * hold_validation
            raise DatasetError(
                f"{self.path / GOOD_FOLDER}: {len(good)} image(s); at least {needed} are needed "
                f"({', '.join(shares)})"
            )
        test: list[Path] = []
        if hold_test:
            held = set(holdout_indices(len(good), TEST_FRACTION))
            test = [p for i, p in enumerate(good) if i in held]
            good = [p for i, p in enumerate(good) if i not in held]
        validation: list[Path] = []
        if hold_validation:
            held = set(holdout_indices(len(good), VALIDATION_FRACTION, MIN_VALIDATION_IMAGES))
            validation = [p for i, p in enumerate(good) if i in held]
            good = [p for i, p in enumerate(good) if i not in held]
        return good, validation, test

    def _bad_samples(self) -> list[Sample]:
        """The images of ``bad/`` with their masks from ``masks/`` (when that folder exists)."""
        bad_folder, masks_folder = self.path / BAD, self.path / MASKS_FOLDER
        images = list_image_files(bad_folder) if bad_folder.is_dir() else []
        if not masks_folder.is_dir():
            return [Sample(self.category, "test", BAD, image) for image in images]
        stems = {image.stem for image in images}
        masks: dict[str, Path] = {}
        for mask in list_image_files(masks_folder):
            stem = mask.stem if mask.stem in stems else mask.stem.removesuffix(MASK_SUFFIX)
            if stem not in stems:
                raise DatasetError(
                    f"{mask}: mask without its bad image; expected {bad_folder}/{stem}.* "
                    "(masks are named after the bad image: x.png or x_mask.png)"
                )
            if stem in masks:
                raise DatasetError(
                    f"{mask}: a second mask for {bad_folder}/{stem}.* (also {masks[stem].name}); "
                    "keep one"
                )
            masks[stem] = mask
        samples = []
        for image in images:
            if image.stem not in masks:
                raise DatasetError(
                    f"{image}: bad image without a mask; with {masks_folder} present every bad "
                    f"image needs one ({image.stem}.png or {image.stem}{MASK_SUFFIX}.png there)"
                )
            samples.append(Sample(self.category, "test", BAD, image, (masks[image.stem],)))
        return samples
