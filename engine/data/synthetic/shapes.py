"""Drawing primitives in *design coordinates*: pixels of a category's default image size.

Objects are built from two shape kinds, polygons and strokes, so that the same list can be painted
in colour onto an image or as a silhouette into a ground-truth mask (see ``raster``). Angles are in
radians; point arrays are float ``(N, 2)`` in ``(x, y)`` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Color = tuple[int, ...]  # RGB, or RGBA where alpha blends the shape over what lies below


@dataclass(frozen=True, eq=False)
class Polygon:
    """A filled polygon; ``points`` is ``(N, 2)``."""

    points: np.ndarray
    fill: Color


@dataclass(frozen=True, eq=False)
class Stroke:
    """A polyline of constant ``width`` with round joins and caps; ``points`` is ``(N, 2)``."""

    points: np.ndarray
    width: float
    fill: Color


Shape = Polygon | Stroke


def rotate_points(points: np.ndarray, angle: float, about: tuple[float, float]) -> np.ndarray:
    """Rotate ``(N, 2)`` points by ``angle`` around ``about``."""
    c, s = np.cos(angle), np.sin(angle)
    rel = np.asarray(points, dtype=np.float64) - about
    return np.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]], 1) + about


def ellipse_points(
    center: tuple[float, float], radii: tuple[float, float], angle: float = 0.0, n: int = 28
) -> np.ndarray:
    """``(n, 2)`` outline of an ellipse with half-axes ``radii``, rotated by ``angle``."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([radii[0] * np.cos(t), radii[1] * np.sin(t)], 1) + center
    return rotate_points(pts, angle, center)


def rect_points(
    center: tuple[float, float], size: tuple[float, float], angle: float = 0.0
) -> np.ndarray:
    """``(4, 2)`` corners of a ``size = (w, h)`` rectangle, rotated by ``angle``."""
    hw, hh = size[0] / 2, size[1] / 2
    pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]]) + center
    return rotate_points(pts, angle, center)


def rounded_rect_points(
    center: tuple[float, float],
    size: tuple[float, float],
    radius: float,
    angle: float = 0.0,
    n_corner: int = 6,
) -> np.ndarray:
    """Outline of a rectangle with rounded corners of ``radius``, rotated by ``angle``."""
    hw, hh = size[0] / 2, size[1] / 2
    radius = min(radius, hw, hh)
    corners = [(hw - radius, hh - radius), (-hw + radius, hh - radius)]
    corners += [(-hw + radius, -hh + radius), (hw - radius, -hh + radius)]
    pts = []
    for k, (cx, cy) in enumerate(corners):
        t = np.linspace(k * np.pi / 2, (k + 1) * np.pi / 2, n_corner)
        pts.append(np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1))
    return rotate_points(np.concatenate(pts) + center, angle, center)


def regular_polygon_points(
    center: tuple[float, float], radius: float, n_sides: int, angle: float = 0.0
) -> np.ndarray:
    """``(n_sides, 2)`` corners of a regular polygon (e.g. a hexagonal nut)."""
    return ellipse_points(center, (radius, radius), angle, n_sides)


def blob_points(
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    roughness: float = 0.35,
    n: int = 16,
) -> np.ndarray:
    """An irregular closed outline around ``center`` (dirt, tears, bruises)."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * (1.0 + roughness * rng.uniform(-1, 1, n))
    aspect = rng.uniform(0.6, 1.0)
    pts = np.stack([r * np.cos(t), aspect * r * np.sin(t)], 1) + center
    return rotate_points(pts, rng.uniform(0, np.pi), center)


def bezier_points(control: np.ndarray, n: int = 32) -> np.ndarray:
    """``(n, 2)`` samples of the cubic Bézier curve with ``(4, 2)`` control points."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = np.asarray(control, dtype=np.float64)
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def stroke_outline(points: np.ndarray, width: float) -> np.ndarray:
    """The polygon ``(2N, 2)`` covering a polyline of ``width`` (butt ends, mitre-free joins)."""
    pts = np.asarray(points, dtype=np.float64)
    tangent = np.gradient(pts, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) * (width / 2)
    return np.concatenate([pts + normal, (pts - normal)[::-1]])


def polyline_length(points: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())


def shade(color: Color, factor: float) -> Color:
    """``color`` with its RGB scaled by ``factor`` (alpha kept)."""
    rgb = tuple(int(np.clip(round(c * factor), 0, 255)) for c in color[:3])
    return rgb + tuple(color[3:])


def mix(a: Color, b: Color, t: float) -> Color:
    """Linear blend of two RGB colours, ``t = 0`` gives ``a``."""
    return tuple(round((1 - t) * x + t * y) for x, y in zip(a[:3], b[:3]))


def vary(rng: np.random.Generator, color: Color, amount: float) -> Color:
    """``color`` with an independent relative jitter of up to ``amount`` per channel."""
    return tuple(
        int(np.clip(round(c * (1 + rng.uniform(-amount, amount))), 0, 255)) for c in color[:3]
    ) + tuple(color[3:])


def shadow(shape: Polygon, offset: tuple[float, float] = (1.5, 2.0), alpha: int = 70) -> Polygon:
    """A soft dark copy of ``shape`` shifted by ``offset``, painted before the object."""
    return Polygon(shape.points + offset, (0, 0, 0, alpha))


DIRT_COLORS: tuple[Color, ...] = ((45, 38, 30), (70, 60, 48), (30, 30, 34), (95, 80, 60))


def contamination(
    rng: np.random.Generator, center: tuple[float, float], radius: float
) -> list[Shape]:
    """A dirt particle: an irregular blob, sometimes with a fibre, in a dark dirt colour."""
    color = DIRT_COLORS[rng.integers(len(DIRT_COLORS))]
    shapes: list[Shape] = [Polygon(blob_points(rng, center, radius, 0.4), color)]
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        end = np.array(center) + 1.8 * radius * np.array([np.cos(angle), np.sin(angle)])
        bend = (np.array(center) + end) / 2 + rng.uniform(-radius, radius, 2) * 0.5
        shapes.append(Stroke(np.array([center, bend, end]), max(1.2, radius / 4), color))
    return shapes
