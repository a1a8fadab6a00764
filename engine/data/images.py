"""Reading and validating image and ground-truth mask files.

Every failure on a file raises :class:`DatasetError` whose message names the file. Pixels are
returned as stored: EXIF orientation is not applied, so images stay aligned with their masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from engine.data.types import DatasetError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Modes that decode losslessly to 8-bit RGB; alpha-carrying ones are checked for opacity first.
_RGB_MODES = frozenset({"RGB", "L", "P", "1"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_MASK_MODES = frozenset({"L", "P", "1", "I", "I;16", "I;16L", "I;16B"})
_CONVERT_HINT = (
    "convert it to 8-bit RGB first: scale 16-bit values with `arr >> 8` or float values in "
    "[0, 1] with `np.round(arr * 255)`, cast to uint8 and save with "
    "`Image.fromarray(arr).convert('RGB').save('x.png')`"
)


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily (header only), turning every Pillow/OS failure into DatasetError.

    Images above ``PIL.Image.MAX_IMAGE_PIXELS`` are refused from the header: Pillow itself only
    warns up to twice that limit and would decode them (a 12 KB PNG can decode to over 1 GB).
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"{path}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: not an image file Pillow can read ({exc})") from exc
    limit = Image.MAX_IMAGE_PIXELS
    width, height = im.size
    if limit is not None and width * height > limit:
        im.close()
        raise DatasetError(
            f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS); refused as a possible decompression bomb"
        )
    return im


def _has_wide_samples(im: Image.Image) -> bool:
    """True when the file stores more than 8 bits per sample.

    Pillow opens 48-bit RGB and 64-bit RGBA PNG/TIFF as mode ``RGB``/``RGBA`` and silently drops
    the low byte, so the raw mode of the undecoded tiles is the only place the depth shows.
    """
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return True
    for tile in im.tile:
        args = tile.args
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and (";16" in rawmode or rawmode.startswith(("I;", "F"))):
            return True
    return False


def _decode(im: Image.Image, path: Path) -> Image.Image:
    """Decode all pixels now so truncated or corrupt data fails here, not later as zero padding.

    Returns the loaded image (a reopened one when the header check consumed ``im``).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone enabled Pillow's padding of truncated files process-wide; the chunk CRC walk of
        # verify() still detects truncation (it consumes the image, so reopen afterwards).
        try:
            im.verify()
        except Exception as exc:
            raise DatasetError(f"{path}: corrupt or truncated image ({exc})") from exc
        im = _open(path)
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated image ({exc})") from exc
    return im


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB ``uint8`` of shape (H, W, 3).

    Conversion policy:

    - 8-bit RGB: returned as is.
    - 8-bit grayscale, 1-bit and palette images: converted to RGB (gray replicated per channel).
    - RGBA / LA / PA, or any image with a transparency key: converted (alpha dropped) only when
      every pixel is fully opaque; real transparency is refused, since what lies behind it is
      undefined.
    - 16-bit (``I;16``, 48-bit RGB, 64-bit RGBA), 32-bit integer and float images: refused; they
      must be converted to 8 bits by the user, who knows how their range maps.
    - Other modes (CMYK, YCbCr, ...): refused.

    Missing, empty, unreadable, truncated or non-image files raise :class:`DatasetError`.
    """
    path = Path(path)
    with _open(path) as im:
        if _has_wide_samples(im):
            raise DatasetError(
                f"{path}: image mode {im.mode!r} stored with more than 8 bits per sample "
                "(16-bit, 32-bit or float) is not supported; " + _CONVERT_HINT
            )
        if im.mode not in _RGB_MODES | _ALPHA_MODES:
            raise DatasetError(
                f"{path}: image mode {im.mode!r} is not supported; save it as 8-bit RGB PNG"
            )
        im = _decode(im, path)
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"))
            if (rgba[..., 3] != 255).any():
                raise DatasetError(
                    f"{path}: image has transparent pixels; flatten it onto a background "
                    "and save it as RGB"
                )
            return np.ascontiguousarray(rgba[..., :3])
        return np.array(im.convert("RGB"))


def _read_integer_mask(path: Path) -> np.ndarray:
    """Decode a mask PNG into a 2-D integer array, as the official LOCO reader sees it."""
    with _open(path) as im:
        if im.mode not in _MASK_MODES:
            raise DatasetError(
                f"{path}: a ground-truth mask must be a single-channel integer image, "
                f"got mode {im.mode!r}"
            )
        im = _decode(im, path)
        arr = np.asarray(im)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim != 2:
        raise DatasetError(f"{path}: a ground-truth mask must be 2-D, got shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise DatasetError(f"{path}: negative values in a ground-truth mask")
    return arr


def read_mask(path: str | Path) -> tuple[np.ndarray, int]:
    """Read one ground-truth channel: pixels must be 0 or exactly one positive value.

    Used for MVTec LOCO AD GT PNGs (the value selects the ``defects_config.json`` entry) and for
    MVTec AD ``*_mask.png`` files (0/255). Palette images are read as their indices, as the
    official evaluator does.

    Returns:
        ``(mask, pixel_value)``: ``mask`` bool (H, W) true on the defect, ``pixel_value`` the
        positive value.

    Raises:
        DatasetError: missing/unreadable file, more than one channel, two distinct positive
            values, or no positive pixel at all.
    """
    path = Path(path)
    arr = _read_integer_mask(path)
    value = int(arr.max()) if arr.size else 0
    if value == 0:
        raise DatasetError(f"{path}: ground-truth mask has no defect pixel (all zero)")
    mask = arr == value
    if not (mask | (arr == 0)).all():
        positives = np.unique(arr[arr > 0]).tolist()
        raise DatasetError(
            f"{path}: ground-truth mask must hold 0 and one positive value, got values {positives}"
        )
    return mask, value


def check_mask_size(mask: np.ndarray, mask_path: Path, image_path: Path) -> None:
    """Raise DatasetError unless ``mask`` (H, W) has the size of the image at ``image_path``."""
    height, width = read_image_size(image_path)
    if mask.shape != (height, width):
        raise DatasetError(
            f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
            f"the image size {width}x{height} of {image_path}"
        )


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels."""
    path = Path(path)
    with _open(path) as im:
        width, height = im.size
    return height, width


def common_image_size(paths: Iterable[Path]) -> tuple[int, int]:
    """The one (height, width) shared by all ``paths`` (headers only).

    Raises:
        DatasetError: naming the first file whose size differs from the first file's.
        ValueError: when ``paths`` is empty.
    """
    first: Path | None = None
    size: tuple[int, int] | None = None
    for path in paths:
        current = read_image_size(path)
        if size is None:
            first, size = path, current
        elif current != size:
            raise DatasetError(
                f"{path}: image size {current[1]}x{current[0]} differs from "
                f"{size[1]}x{size[0]} of {first}; all images of a category must have one size"
            )
    if size is None:
        raise ValueError("common_image_size needs at least one path")
    return size


def list_image_files(folder: Path) -> list[Path]:
    """Image files of ``folder`` sorted by name; hidden entries (``.DS_Store``...) are skipped.

    Raises:
        DatasetError: when the folder holds a sub-folder, a non-image file, or two images with
            the same stem (maps and GT folders are matched by stem).
    """
    by_stem: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise DatasetError(f"{entry}: unexpected folder; {folder} must hold only images")
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(
                f"{entry}: unexpected file; {folder} must hold only images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        if entry.stem in by_stem:
            raise DatasetError(
                f"{entry}: same stem as {by_stem[entry.stem].name}; image stems must be unique"
            )
        by_stem[entry.stem] = entry
    return list(by_stem.values())
