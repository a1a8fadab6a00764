"""What a category module produces: a scene (shapes, ground-truth channels, facts) and its rules.

Each category module exposes one ``CategoryDef``. Its ``build_scene(rng, defect)`` draws a random
good scene, or one with the named defect, in design coordinates; ``facts`` describes the scene in
words and numbers (object counts, types, levels) so that tests can check the logical rules without
looking at pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from engine.data.synthetic.shapes import Color, Polygon, Shape
from engine.data.types import LOGICAL, STRUCTURAL


@dataclass(frozen=True)
class DefectType:
    """One ``defects_config.json`` entry before it is sized to an output resolution.

    Exactly one of ``relative_saturation`` (a fraction of the region, as LOCO uses for most types)
    and ``saturation_shapes`` (absolute: the pixel area of these nominal objects, as LOCO uses for
    missing and additional objects) is set.
    """

    name: str
    kind: str  # LOGICAL or STRUCTURAL
    relative_saturation: float | None = 1.0
    saturation_shapes: Callable[[], list[Shape]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in (LOGICAL, STRUCTURAL):
            raise ValueError(
                f"defect kind must be {LOGICAL!r} or {STRUCTURAL!r}, got {self.kind!r}"
            )
        if (self.relative_saturation is None) == (self.saturation_shapes is None):
            raise ValueError(f"{self.name}: set exactly one of relative or absolute saturation")


def logical(name: str, relative: float = 1.0) -> DefectType:
    return DefectType(name, LOGICAL, relative_saturation=relative)


def logical_absolute(name: str, objects: Callable[[], list[Shape]]) -> DefectType:
    return DefectType(name, LOGICAL, relative_saturation=None, saturation_shapes=objects)


def structural(name: str) -> DefectType:
    return DefectType(name, STRUCTURAL)


def region(points: np.ndarray) -> Polygon:
    """A polygon used only as a ground-truth region (never painted)."""
    return Polygon(points, (255, 255, 255))


@dataclass(frozen=True, eq=False)
class Part:
    """One drawn object: ``paint`` in paint order (shadows included), ``silhouette`` the region
    a ground-truth channel covers when this object is the defect."""

    paint: list[Shape]
    silhouette: list[Shape]


@dataclass(frozen=True, eq=False)
class Channel:
    """One ground-truth PNG: the region of ``defect``, the union of ``shapes`` minus the union of
    ``exclude`` (e.g. juice hidden behind a label)."""

    defect: str
    shapes: list[Shape]
    exclude: list[Shape] = field(default_factory=list)


@dataclass(eq=False)
class Scene:
    """A rendered-to-be image: ``shapes`` in paint order, its defect channels and its facts."""

    shapes: list[Shape]
    channels: list[Channel] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class CategoryDef:
    """Everything the writer needs to know about one category."""

    name: str
    design_size: tuple[int, int]  # (W, H): the default output size; scene coordinates use it
    defect_types: tuple[DefectType, ...]  # LOCO order: pixel values count down from 255
    build_scene: Callable[[np.random.Generator, str | None], Scene]
    backdrop_color: Color
    backdrop_texture: float
    jitter_angle: float  # max rigid rotation of the whole scene, radians
    jitter_shift: float  # max rigid shift, design pixels
    description: str

    def types_of(self, kind: str) -> tuple[DefectType, ...]:
        return tuple(d for d in self.defect_types if d.kind == kind)


def check_defect(category: str, defect: str | None, known: tuple[DefectType, ...]) -> None:
    """Raise ``ValueError`` unless ``defect`` is None or one of ``known``."""
    names = [d.name for d in known]
    if defect is not None and defect not in names:
        raise ValueError(f"unknown {category} defect {defect!r}; valid: {', '.join(names)}")


Footprint = tuple[np.ndarray, float]  # (points (K, 2), radius): a chain of discs
T = TypeVar("T")


def sample_separated(
    propose: Callable[[], T],
    footprint: Callable[[T], Footprint],
    placed: list[Footprint],
    gap: float,
    attempts: int = 400,
) -> T | None:
    """Rejection-sample a proposal whose footprint keeps ``gap`` from the ``placed`` footprints.

    A chain of discs is enough for round parts (one point) and elongated ones (points along the
    axis). Returns None when ``attempts`` run out.
    """
    for _ in range(attempts):
        candidate = propose()
        pts, radius = footprint(candidate)
        if all(
            np.linalg.norm(pts[:, None, :] - other[None, :, :], axis=2).min() >= radius + r + gap
            for other, r in placed
        ):
            return candidate
    return None
