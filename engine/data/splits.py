"""What the MVTec AD and folder readers share: samples listed per split, one mask per image."""

from __future__ import annotations

from engine.data.images import check_mask_size, common_image_size, read_mask
from engine.data.types import SPLITS, GroundTruthChannel, Sample


class ListedSplits:
    """A category whose reader lists every split's samples in ``_samples`` when opened, each
    anomalous sample with at most one mask (a single ground-truth channel)."""

    _samples: dict[str, list[Sample]]

    def samples(self, split: str) -> list[Sample]:
        """The samples of ``split``, in the reader's documented order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._samples[split])

    def ground_truth(self, sample: Sample) -> list[GroundTruthChannel]:
        """The sample's mask as one binary GT channel; empty without a mask (good images)."""
        channels = []
        for mask_path in sample.mask_paths:
            mask, _ = read_mask(mask_path)
            check_mask_size(mask, mask_path, sample.image_path)
            channels.append(GroundTruthChannel(mask))
        return channels

    def image_size(self, split: str | None = None) -> tuple[int, int]:
        """(height, width) shared by the images of ``split`` (all splits when None); headers only."""
        splits = SPLITS if split is None else (split,)
        return common_image_size(
            sample.image_path for name in splits for sample in self.samples(name)
        )
