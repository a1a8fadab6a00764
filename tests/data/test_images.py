"""engine.data.images: the RGB conversion policy, mask rules and file-level failures."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from engine.data.images import (
    common_image_size,
    list_image_files,
    read_image_size,
    read_mask,
    read_rgb,
)
from engine.data.types import DatasetError


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, row: bytes) -> bytes:
    """A minimal PNG built by hand: Pillow cannot write 48-bit RGB, so write the chunks."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _rng_image(height: int = 12, width: int = 10) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_read_rgb_roundtrip(image_file) -> None:
    array = _rng_image()
    out = read_rgb(image_file("rgb.png", array))
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, array)
    out[0, 0] = 0  # callers may modify the result in place


def test_grayscale_is_converted(image_file) -> None:
    gray = _rng_image()[..., 0]
    out = read_rgb(image_file("gray.png", gray))
    assert out.shape == (12, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_palette_is_converted(image_file) -> None:
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[:, 3:] = (200, 10, 30)
    path = image_file("palette.png", array)
    Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_rgb(path), array)


def test_opaque_rgba_is_converted(image_file) -> None:
    rgb = _rng_image()
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(read_rgb(image_file("opaque.png", rgba)), rgb)


def test_opaque_la_is_converted(image_file) -> None:
    gray = _rng_image()[..., 0]
    la = Image.fromarray(np.stack([gray, np.full_like(gray, 255)], axis=2), mode="LA")
    path = image_file("la.png", gray)
    la.save(path)
    np.testing.assert_array_equal(read_rgb(path)[..., 1], gray)


def test_transparent_rgba_is_refused(image_file) -> None:
    rgba = np.concatenate([_rng_image(), np.full((12, 10, 1), 255, np.uint8)], axis=2)
    rgba[3, 4, 3] = 128
    path = image_file("transparent.png", rgba)
    with pytest.raises(DatasetError, match="transparent") as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_16bit_grayscale_is_refused(image_file) -> None:
    path = image_file("gray16.png", (np.arange(120).reshape(12, 10) * 500).astype(np.uint16))
    assert Image.open(path).mode.startswith("I;16")
    with pytest.raises(DatasetError, match="8 bits") as info:
        read_rgb(path)
    assert str(path) in str(info.value) and "convert" in str(info.value)


@pytest.mark.parametrize(("color_type", "channels"), [(2, 3), (6, 4)], ids=["rgb48", "rgba64"])
def test_16bit_color_is_refused(tmp_path: Path, color_type: int, channels: int) -> None:
    path = tmp_path / "deep.png"
    path.write_bytes(_png_bytes(4, 3, 16, color_type, bytes(range(4 * channels * 2))))
    # Pillow decodes these to 8 bits without complaint: the reader must look at the raw depth.
    assert Image.open(path).mode in ("RGB", "RGBA")
    with pytest.raises(DatasetError, match="8 bits") as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_float_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "float.tiff"
    Image.fromarray(np.zeros((4, 5), np.float32)).save(path)
    with pytest.raises(DatasetError, match="float") as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_cmyk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (5, 4)).save(path)
    with pytest.raises(DatasetError, match="CMYK") as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_image_is_refused(image_file) -> None:
    path = _truncated(image_file("cut.png", _rng_image(64, 64)))
    with pytest.raises(DatasetError, match="truncated") as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_truncated_image_is_refused_when_pillow_pads(
    image_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _truncated(image_file("cut.png", _rng_image(64, 64)))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetError) as info:
        read_rgb(path)
    assert str(path) in str(info.value)
    good = image_file("whole.png", _rng_image())
    np.testing.assert_array_equal(read_rgb(good), _rng_image())


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n garbage"],
    ids=["empty", "text", "bad-png"],
)
def test_unreadable_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory_are_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.png", tmp_path):
        with pytest.raises(DatasetError, match="not found") as info:
            read_rgb(path)
        assert str(path) in str(info.value)


def test_read_mask_returns_bool_and_value(image_file) -> None:
    array = np.zeros((6, 8), np.uint8)
    array[1:3, 2:5] = 253
    mask, value = read_mask(image_file("m.png", array))
    assert value == 253 and mask.dtype == bool
    np.testing.assert_array_equal(mask, array > 0)


def test_read_mask_16bit_integer(image_file) -> None:
    array = np.zeros((6, 8), np.uint16)
    array[0, 0] = 255
    mask, value = read_mask(image_file("m16.png", array))
    assert value == 255 and mask.sum() == 1


def test_read_mask_two_positive_values(image_file) -> None:
    array = np.zeros((6, 8), np.uint8)
    array[0, 0], array[5, 7] = 255, 254
    path = image_file("two.png", array)
    with pytest.raises(DatasetError, match=r"254, 255") as info:
        read_mask(path)
    assert str(path) in str(info.value)


def test_read_mask_all_zero(image_file) -> None:
    path = image_file("zero.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(DatasetError, match="all zero") as info:
        read_mask(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_read_mask_multichannel(image_file, mode: str) -> None:
    array = np.zeros((6, 8), np.uint8)
    array[2, 2] = 255
    path = image_file(f"color-{mode}.png", array, mode=mode)
    with pytest.raises(DatasetError, match="single-channel") as info:
        read_mask(path)
    assert str(path) in str(info.value)


def test_read_mask_truncated(image_file) -> None:
    array = np.random.default_rng(1).integers(0, 2, (64, 64), dtype=np.uint8) * 255
    path = _truncated(image_file("cut-mask.png", array))
    with pytest.raises(DatasetError) as info:
        read_mask(path)
    assert str(path) in str(info.value)


def test_read_image_size_and_common_size(image_file) -> None:
    a = image_file("a.png", _rng_image(12, 10))
    b = image_file("b.png", _rng_image(12, 10))
    c = image_file("c.png", _rng_image(10, 12))
    assert read_image_size(a) == (12, 10)
    assert common_image_size([a, b]) == (12, 10)
    with pytest.raises(DatasetError, match="differs") as info:
        common_image_size([a, b, c])
    assert str(c) in str(info.value)
    with pytest.raises(ValueError, match="at least one"):
        common_image_size([])


def test_list_image_files(tmp_path: Path) -> None:
    for name in ("002.png", "000.png", "001.JPG", ".DS_Store"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_image_files(tmp_path)] == ["000.png", "001.JPG", "002.png"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="unexpected file") as info:
        list_image_files(tmp_path)
    assert "notes.txt" in str(info.value)


def test_list_image_files_duplicate_stem(tmp_path: Path) -> None:
    for name in ("000.png", "000.jpg"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DatasetError, match="stem"):
        list_image_files(tmp_path)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 11000x10000 1-bit PNG (110 Mpx, ~13 KB): above Pillow's default limit of ~89.5 Mpx
    but below the 2x at which Pillow itself raises, so Pillow alone would decode it."""
    path = tmp_path_factory.mktemp("bomb") / "huge.png"
    Image.new("1", (11_000, 10_000)).save(path)
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_above_the_pixel_limit_are_refused_from_the_header(huge_png: Path) -> None:
    assert Image.MAX_IMAGE_PIXELS < 110_000_000 < 2 * Image.MAX_IMAGE_PIXELS
    assert huge_png.stat().st_size < 50_000
    with pytest.raises(DatasetError, match=rf"^{huge_png}: 11000x10000 = 110000000 pixels"):
        read_image_size(huge_png)
    with pytest.raises(DatasetError, match="decompression bomb"):
        common_image_size([huge_png])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_pillows_current_setting(
    image_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = image_file("image.png", np.zeros((10, 20, 3), np.uint8))
    mask = image_file("mask.png", np.full((10, 20), 255, np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 200 px: warned, not raised, by Pillow
    for read in (read_rgb, read_mask):
        with pytest.raises(DatasetError, match="exceeds the limit of 150"):
            read(image if read is read_rgb else mask)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user turned the check off
    assert read_rgb(image).shape == (10, 20, 3)
