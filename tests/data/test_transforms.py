"""engine.data.transforms: resize + normalise, the batched path, and the cached Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from engine.data.loco import LocoDataset
from engine.data.transforms import ImageFolderDataset, ImageTransform
from engine.data.types import DatasetError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _image(height: int = 24, width: int = 32, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _normalize_numpy(image: np.ndarray) -> np.ndarray:
    """Independent reference for stage 2: (H, W, 3) uint8 -> (3, H, W) float."""
    scaled = image.astype(np.float64) / 255.0
    return ((scaled - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


def test_same_size_is_normalisation_only() -> None:
    image = _image(16, 16)
    out = ImageTransform(16, MEAN, STD)(image)
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    np.testing.assert_allclose(out.numpy(), _normalize_numpy(image), atol=1e-5)


@pytest.mark.parametrize(("height", "width", "size"), [(24, 32, 16), (24, 32, 40), (64, 48, 20)])
def test_resize_matches_pillow_antialiased_bilinear(height: int, width: int, size: int) -> None:
    image = _image(height, width)
    resized = ImageTransform(size, MEAN, STD).resize(image)
    assert resized.dtype == np.uint8 and resized.shape == (size, size, 3)
    reference = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    # Pillow's uint8 fixed-point kernel and torch's float kernel differ by rounding only.
    diff = np.abs(resized.astype(int) - reference.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.2


def test_constant_image_stays_constant() -> None:
    image = np.full((30, 50, 3), (10, 128, 250), dtype=np.uint8)
    out = ImageTransform(8, MEAN, STD)(image)
    np.testing.assert_allclose(out.numpy(), _normalize_numpy(image[:8, :8]), atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_matches_single_images(channels_last: bool) -> None:
    transform = ImageTransform(20, MEAN, STD)
    images = [_image(seed=s) for s in range(3)]
    frames = torch.from_numpy(np.stack(images))
    if not channels_last:
        frames = frames.permute(0, 3, 1, 2).contiguous()
    batch = transform.batch(frames)
    assert batch.dtype == torch.float32 and batch.shape == (3, 3, 20, 20)
    for i, image in enumerate(images):
        torch.testing.assert_close(batch[i], transform(image), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (torch.zeros(1, 8, 8, 3), "uint8"),
        (np.zeros((1, 8, 8, 3), np.uint8), "uint8 tensor"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), r"\(B, H, W, 3\)"),
        (torch.zeros(1, 8, 8, 4, dtype=torch.uint8), r"\(B, H, W, 3\)"),
        (torch.zeros(1, 3, 8, 3, dtype=torch.uint8), "ambiguous"),
    ],
)
def test_batch_rejects_bad_frames(frames, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageTransform(8, MEAN, STD).batch(frames)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "uint8 numpy"),
        (np.zeros((8, 8), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((8, 8, 4), np.uint8), r"\(H, W, 3\)"),
    ],
)
def test_call_rejects_bad_images(image, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageTransform(8, MEAN, STD)(image)


def test_normalize_rejects_unresized_image() -> None:
    with pytest.raises(ValueError, match=r"\(8, 8, 3\)"):
        ImageTransform(8, MEAN, STD).normalize(_image(9, 8))


@pytest.mark.parametrize(
    ("size", "mean", "std", "match"),
    [
        (0, MEAN, STD, "size"),
        (8.0, MEAN, STD, "size"),
        (8, MEAN[:2], STD, "3 values"),
        (8, MEAN, (0.2, 0.0, 0.2), "positive"),
        (8, (0.5, float("nan"), 0.5), STD, "finite"),
    ],
)
def test_bad_constructor_arguments(size, mean, std, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageTransform(size, mean, std)


def test_folder_dataset_cache_matches_uncached(loco_tree) -> None:
    samples = LocoDataset(loco_tree.root, loco_tree.category).samples("test")
    transform = ImageTransform(16, MEAN, STD)
    cached = ImageFolderDataset(samples, transform, cache=True, progress=False)
    direct = ImageFolderDataset(samples, transform, cache=False)
    assert len(cached) == len(direct) == len(samples)
    for index in range(len(samples)):
        a, i = cached[index]
        b, j = direct[index]
        assert i == j == index
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert cached[-1][1] == len(samples) - 1
    with pytest.raises(IndexError):
        cached[len(samples)]


def test_folder_dataset_cache_does_not_reread_files(loco_tree) -> None:
    samples = LocoDataset(loco_tree.root, loco_tree.category).samples("train")
    transform = ImageTransform(16, MEAN, STD)
    cached = ImageFolderDataset(samples, transform, cache=True, progress=False)
    uncached = ImageFolderDataset(samples, transform, cache=False)
    expected = transform(_read(samples[0].image_path))
    for sample in samples:
        sample.image_path.unlink()
    torch.testing.assert_close(cached[0][0], expected, atol=0, rtol=0)
    with pytest.raises(DatasetError, match="not found"):
        uncached[0]


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_folder_dataset_with_dataloader(loco_tree) -> None:
    samples = LocoDataset(loco_tree.root, loco_tree.category).samples("train")
    dataset = ImageFolderDataset(samples, ImageTransform(16, MEAN, STD), progress=False)
    images, indices = next(iter(DataLoader(dataset, batch_size=2, shuffle=False)))
    assert images.shape == (2, 3, 16, 16) and indices.tolist() == [0, 1]


def test_folder_dataset_progress_switch(loco_tree, capsys: pytest.CaptureFixture) -> None:
    samples = LocoDataset(loco_tree.root, loco_tree.category).samples("train")
    ImageFolderDataset(samples, ImageTransform(16, MEAN, STD), progress=False)
    assert "decode images" not in capsys.readouterr().err
    ImageFolderDataset(samples, ImageTransform(16, MEAN, STD), progress=True)
    assert "decode images" in capsys.readouterr().err


def test_folder_dataset_needs_samples() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        ImageFolderDataset([], ImageTransform(16, MEAN, STD))


def test_transforms_compare_by_value() -> None:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    assert ImageTransform(64, mean, std) == ImageTransform(64, list(mean), list(std))
    assert ImageTransform(64, mean, std) != ImageTransform(128, mean, std)
    assert ImageTransform(64, mean, std) != ImageTransform(64, mean, (0.5, 0.25, 0.25))
