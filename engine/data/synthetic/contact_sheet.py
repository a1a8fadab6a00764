"""A one-page visual overview of a LOCO-layout category: test images with outlined GT regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_dilation

from engine.data.types import GOOD, LOGICAL, STRUCTURAL, DatasetError

OUTLINE_COLORS = ((255, 0, 255), (0, 230, 255), (255, 240, 0), (80, 255, 80))
LABEL_LINES = 3
FONT_SIZE = 11
PAD = 4


def _read_png(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode == "RGB" else im)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err


def _defect_names(category_dir: Path) -> dict[int, str]:
    path = category_dir / "defects_config.json"
    try:
        entries = json.loads(path.read_text())
        return {int(e["pixel_value"]): str(e["defect_name"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"cannot read defect names from {path}: {err}") from err


def _channels(gt_dir: Path, names: dict[int, str]) -> list[tuple[str, np.ndarray]]:
    if not gt_dir.is_dir():
        raise DatasetError(f"missing ground-truth folder {gt_dir}")
    out = []
    for png in sorted(gt_dir.glob("*.png")):
        mask = _read_png(png, "L")
        values = np.unique(mask[mask > 0])
        if values.size != 1 or int(values[0]) not in names:
            raise DatasetError(
                f"{png}: expected one positive pixel value from the config, got {values.tolist()}"
            )
        out.append((names[int(values[0])], mask > 0))
    return out


def _pick(
    category_dir: Path, folder: str, n: int, names: dict[int, str]
) -> list[tuple[Path, list]]:
    """Up to ``n`` images of ``test/folder``, covering as many different defect names as possible."""
    images = sorted((category_dir / "test" / folder).glob("*.png"))
    if folder == GOOD:
        return [(p, []) for p in images[:n]]
    items = [(p, _channels(category_dir / "ground_truth" / folder / p.stem, names)) for p in images]
    seen: set[str] = set()
    first, rest = [], []
    for item in items:
        key = item[1][0][0] if item[1] else ""
        (rest if key in seen else first).append(item)
        seen.add(key)
    return (first + rest)[:n]


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for token in text.replace("_", "_\u200b").replace(" ", " \u200b").split("\u200b"):
        if line and draw.textlength(line + token, font=font) > width:
            lines.append(line)
            line = ""
        line += token
    return [*lines, line][:LABEL_LINES]


def _tile(
    image: np.ndarray, channels: list[tuple[str, np.ndarray]], label: str, font
) -> Image.Image:
    rgb = image.copy()
    for k, (_, mask) in enumerate(channels):
        edge = binary_dilation(mask, iterations=1) & ~mask
        rgb[edge] = OUTLINE_COLORS[k % len(OUTLINE_COLORS)]
    h, w = rgb.shape[:2]
    tile = Image.new("RGB", (w, h + LABEL_LINES * (FONT_SIZE + 2) + PAD), (255, 255, 255))
    tile.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(_wrap(label, draw, font, w - 2)):
        draw.text((1, h + 2 + i * (FONT_SIZE + 2)), line, fill=(0, 0, 0), font=font)
    return tile


def contact_sheet(category_dir: str | Path, out_png: str | Path, n_per_type: int = 4) -> Path:
    """Write a grid of ``n_per_type`` good, logical and structural test images (one row each) with
    their ground-truth regions outlined and defect names underneath. Anomalous images are chosen to
    show as many different defect types as possible. Returns ``out_png``."""
    if not isinstance(n_per_type, int) or n_per_type < 1:
        raise ValueError(f"n_per_type must be a positive int, got {n_per_type!r}")
    category_dir, out_png = Path(category_dir), Path(out_png)
    names = _defect_names(category_dir)
    font = ImageFont.load_default(size=FONT_SIZE)
    rows = []
    for folder in (GOOD, LOGICAL, STRUCTURAL):
        tiles = []
        for path, channels in _pick(category_dir, folder, n_per_type, names):
            label = ", ".join(dict.fromkeys(name for name, _ in channels)) or GOOD
            tiles.append(_tile(_read_png(path, "RGB"), channels, f"{path.stem}: {label}", font))
        rows.append(tiles)
    tiles = [t for row in rows for t in row]
    if not tiles:
        raise DatasetError(f"no test images under {category_dir / 'test'}")
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    title_h = FONT_SIZE + 2 * PAD
    sheet = Image.new(
        "RGB", (n_per_type * (tw + PAD) + PAD, title_h + len(rows) * (th + PAD)), (255, 255, 255)
    )
    ImageDraw.Draw(sheet).text(
        (PAD, PAD),
        f"{category_dir.name}: rows = good, logical, structural",
        fill=(0, 0, 0),
        font=font,
    )
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (PAD + c * (tw + PAD), title_h + r * (th + PAD)))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
