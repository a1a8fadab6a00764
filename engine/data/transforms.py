"""Model-input preprocessing and the torch Dataset used for training and feature extraction.

The transform is defined in two stages so that a cached training set, single images and the
Runtime's batches all see exactly the same numbers:

1. resize: bilinear with antialias to (size, size) in float32, rounded back to uint8 values (the
   aspect ratio is not kept, as usual for MVTec LOCO models);
2. normalise: ``(x / 255 - mean) / std`` per channel (mean/std in [0, 1] units, torchvision style).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from engine.data.images import read_rgb
from engine.data.types import Sample


def _resize_rounded(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, 3, H, W) with values 0..255 -> float (B, 3, size, size) holding whole numbers."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return images.round_().clamp_(0.0, 255.0)


def _check_rgb(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 numpy image, got {type(image).__name__} "
            f"of dtype {getattr(image, 'dtype', None)}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")


class ImageTransform:
    """RGB uint8 images -> normalised float32 model input of size (3, size, size).

    Args:
        size: output side in pixels.
        mean: per-channel RGB mean in [0, 1] units (those of the backbone's weights).
        std: per-channel RGB standard deviation in [0, 1] units, all positive.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        if not all(np.isfinite(mean)) or not all(s > 0 and np.isfinite(s) for s in std):
            raise ValueError(f"mean must be finite and std finite and positive, got {mean}, {std}")
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # (1, 3, 1, 1) mean and std per device, made once: building them per call would copy
        # from the host (a sync on CUDA) on every frame.
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageTransform):
            return NotImplemented
        return (self.size, self.mean, self.std) == (other.size, other.mean, other.std)

    __hash__ = None  # mutable attributes: equal by value, not hashable

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, mean={self.mean}, std={self.std})"

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (size, size, 3): stage 1, what the dataset cache stores."""
        _check_rgb(image)
        chw = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
        resized = _resize_rounded(chw, self.size)[0].permute(1, 2, 0)
        return resized.to(torch.uint8).numpy()

    def normalize(self, resized: np.ndarray) -> torch.Tensor:
        """uint8 (size, size, 3) from :meth:`resize` -> float32 (3, size, size): stage 2."""
        _check_rgb(resized)
        if resized.shape[:2] != (self.size, self.size):
            raise ValueError(
                f"expected a resized image of shape ({self.size}, {self.size}, 3), "
                f"got {resized.shape}"
            )
        chw = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1)
        return self._normalize(chw[None])[0]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) RGB numpy image -> float32 (3, size, size)."""
        return self.normalize(self.resize(image))

    def batch(self, frames: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
        """Batched path on the frames' device: identical to ``__call__`` per image.

        Args:
            frames: uint8 RGB, (B, H, W, 3) or (B, 3, H, W).
            channels_last: the layout, when the caller knows it (True: (B, H, W, 3)); None
                infers it from the shape and refuses one that fits both, such as (B, 3, W, 3).

        Returns:
            float32 (B, 3, size, size).
        """
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 tensor, got {getattr(frames, 'dtype', frames)}")
        shape = tuple(frames.shape)
        if channels_last is None and frames.ndim == 4 and shape[1] == shape[3] == 3:
            raise ValueError(f"ambiguous layout {shape}: both dim 1 and dim 3 have 3 entries")
        if channels_last is None:
            channels_last = frames.ndim == 4 and shape[3] == 3
        if frames.ndim != 4 or shape[3 if channels_last else 1] != 3:
            raise ValueError(f"expected (B, H, W, 3) or (B, 3, H, W), got {shape}")
        if channels_last:
            frames = frames.permute(0, 3, 1, 2)
        return self._normalize(_resize_rounded(frames.float(), self.size))

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float (B, 3, S, S) with values 0..255 -> normalised contiguous float32 (B, 3, S, S)."""
        images = images.contiguous()
        if images.device not in self._stats:
            mean, std = torch.tensor(self.mean), torch.tensor(self.std)
            self._stats[images.device] = (
                mean.view(1, 3, 1, 1).to(images.device),
                std.view(1, 3, 1, 1).to(images.device),
            )
        mean, std = self._stats[images.device]
        return (images / 255.0 - mean) / std


class ImageFolderDataset(Dataset):
    """Torch Dataset over samples, yielding ``(tensor (3, S, S) float32, index)``.

    Args:
        samples: the images to serve, in order.
        transform: the model-input transform.
        cache: decode and resize every image once, up front, and keep the uint8 (S, S, 3) results
            in memory (3·S² bytes per image), so multi-epoch training does not decode PNGs again.
            Without it each access reads the file.
        progress: show a progress bar while filling the cache.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageTransform,
        cache: bool = True,
        progress: bool = True,
    ) -> None:
        if not samples:
            raise ValueError("ImageFolderDataset needs at least one sample")
        self.samples = list(samples)
        self.transform = transform
        self._cache: np.ndarray | None = None
        if cache:
            size = transform.size
            self._cache = np.empty((len(self.samples), size, size, 3), dtype=np.uint8)
            bar = tqdm(self.samples, desc="decode images", unit="img", disable=not progress)
            for i, sample in enumerate(bar):
                self._cache[i] = transform.resize(read_rgb(sample.image_path))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        if self._cache is not None:
            return self.transform.normalize(self._cache[index]), index
        return self.transform(read_rgb(self.samples[index].image_path)), index
