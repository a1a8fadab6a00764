"""Turning shapes into pixels: placement, supersampled painting, masks, lighting and noise.

Scenes are painted at ``SUPERSAMPLE`` times the output size and box-filtered down, which gives
anti-aliased edges without a dependency beyond Pillow. Masks use the same geometry, so a ground-truth
region lines up with what was painted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

from engine.data.synthetic.shapes import Color, Polygon, Shape, Stroke, stroke_outline

SUPERSAMPLE = 2
MASK_COVERAGE = 0.25  # fraction of a pixel a region must cover to be annotated (keeps thin parts)


@dataclass(frozen=True)
class Placement:
    """Maps design coordinates to output pixels: a small rigid jitter, then a uniform scale.

    ``pixel = scale * (R(angle) @ (p - pivot) + pivot + shift) + offset``.
    """

    scale: float
    offset: tuple[float, float]
    pivot: tuple[float, float]
    angle: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        # pixel = points @ matrix + bias; one matmul per shape keeps painting cheap
        c, s = np.cos(self.angle), np.sin(self.angle)
        matrix = self.scale * np.array([[c, s], [-s, c]])
        pivot = np.asarray(self.pivot, dtype=np.float64)
        bias = self.scale * (pivot + np.asarray(self.shift)) + self.offset - pivot @ matrix
        return matrix, bias

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """``(N, 2)`` design points to ``(N, 2)`` output pixel coordinates."""
        matrix, bias = self._affine
        return np.asarray(points, dtype=np.float64) @ matrix + bias


def fit_placement(
    design_size: tuple[int, int],
    size: tuple[int, int],
    angle: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> Placement:
    """Scale the design area uniformly into ``size = (W, H)``, centred (letterboxed if the
    aspect ratio differs), with a rigid jitter about the design centre."""
    scale = min(size[0] / design_size[0], size[1] / design_size[1])
    offset = ((size[0] - scale * design_size[0]) / 2, (size[1] - scale * design_size[1]) / 2)
    pivot = (design_size[0] / 2, design_size[1] / 2)
    return Placement(scale, offset, pivot, angle, shift)


def _paint(
    draw: ImageDraw.ImageDraw, shape: Shape, placement: Placement, fill: Color | int
) -> None:
    if (
        isinstance(shape, Stroke)
        and isinstance(fill, tuple)
        and len(fill) == 4
        and len(shape.points) > 2
    ):
        # a translucent polyline drawn segment by segment darkens where segments overlap
        shape = Polygon(stroke_outline(shape.points, shape.width), fill)
    pts = placement.to_pixels(shape.points) * SUPERSAMPLE
    xy = [(x, y) for x, y in pts.tolist()]
    if isinstance(shape, Polygon):
        draw.polygon(xy, fill=fill)
        return
    width = max(1.0, shape.width * placement.scale * SUPERSAMPLE)
    draw.line(xy, fill=fill, width=round(width), joint="curve")
    r = width / 2
    for x, y in (xy[0], xy[-1]):  # round caps
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def render(shapes: list[Shape], placement: Placement, backdrop: np.ndarray) -> np.ndarray:
    """Paint ``shapes`` in order over ``backdrop`` (float ``(H, W, 3)``); returns float
    ``(H, W, 3)`` in 0..255."""
    h, w = backdrop.shape[:2]
    base = Image.fromarray(np.clip(backdrop, 0, 255).astype(np.uint8), "RGB")
    canvas = base.resize((w * SUPERSAMPLE, h * SUPERSAMPLE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas, "RGBA")
    for shape in shapes:
        _paint(draw, shape, placement, shape.fill)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32)


def rasterize(shapes: list[Shape], placement: Placement, size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` silhouette of the union of ``shapes`` at output size ``(W, H)``."""
    w, h = size
    if not shapes:
        return np.zeros((h, w), dtype=bool)
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        _paint(draw, shape, placement, 255)
    coverage = np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32)
    return coverage >= 255 * MASK_COVERAGE


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-ish float ``(H, W)`` noise with features about ``cell`` pixels wide."""
    w, h = size
    gw, gh = max(2, int(np.ceil(w / cell)) + 1), max(2, int(np.ceil(h / cell)) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.Resampling.BICUBIC))


def textured_backdrop(
    rng: np.random.Generator, size: tuple[int, int], color: Color, texture: float
) -> np.ndarray:
    """A float ``(H, W, 3)`` surface of ``color`` with mottling and grain of relative ``texture``."""
    w, h = size
    scale = min(w, h)
    pattern = 0.6 * smooth_noise(rng, size, scale / 6) + 0.4 * smooth_noise(rng, size, 3)
    rgb = np.asarray(color[:3], dtype=np.float32)
    return rgb * (1 + texture * pattern[..., None])


def expose(img: np.ndarray, rng: np.random.Generator, noise_sigma: float = 2.0) -> np.ndarray:
    """Camera nuisance on a float ``(H, W, 3)`` image: gain, colour temperature, a small colour
    cast, a lighting gradient, uneven illumination and sensor noise; returns uint8 ``(H, W, 3)``.

    The ranges are those of a fixed inspection rig over a shift: a few percent of brightness, a
    lamp that runs slightly warm or cool, never enough to turn one item variant into another.
    """
    h, w = img.shape[:2]
    gain = rng.uniform(0.9, 1.1)
    warmth = rng.uniform(-0.035, 0.035)  # > 0: warmer light, red up and blue down
    cast = 1 + np.array([warmth, 0.0, -warmth]) + rng.uniform(-0.02, 0.02, 3)
    cast = cast.astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    ramp = (np.float32(np.cos(direction)) * xx + np.float32(np.sin(direction)) * yy) * 0.12
    uneven = 0.02 * smooth_noise(rng, (w, h), min(w, h) / 2)
    light = (np.float32(gain) * (1 + ramp + uneven))[..., None] * cast
    noisy = img * light + noise_sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
