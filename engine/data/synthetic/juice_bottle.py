"""juice_bottle: a glass bottle of juice seen from the front, with a top label carrying the fruit
icon and a bottom label carrying text.

Rules: the juice colour matches the fruit on the icon (orange, cherry or banana); the bottle is
filled to the shoulder; the icon label is on top and the text label below it. Good images vary the
fruit, the label placement and the fill level slightly, and the pose.
"""

from __future__ import annotations

import numpy as np

from engine.data.synthetic.scene import (
    CategoryDef,
    Channel,
    Scene,
    check_defect,
    logical,
    logical_absolute,
    region,
    structural,
)
from engine.data.synthetic.shapes import (
    Color,
    Polygon,
    Shape,
    Stroke,
    blob_points,
    contamination,
    ellipse_points,
    mix,
    rect_points,
    rounded_rect_points,
    shade,
    vary,
)

SIZE = (160, 320)
CENTER_X = 80.0
NECK_TOP, SHOULDER_TOP, SHOULDER_BOTTOM, BOTTOM = 34.0, 66.0, 104.0, 300.0
NECK_HALF, BODY_HALF, GLASS = 13.0, 47.0, 2.5
FILL_Y, TOO_MUCH_Y, NOT_ENOUGH_Y = 84.0, 56.0, 130.0
TOP_LABEL = ((CENTER_X, 152.0), (86.0, 60.0))  # centre, size
BOTTOM_LABEL = ((CENTER_X, 243.0), (86.0, 38.0))
ICON_CENTER = (CENTER_X, 148.0)
ICON_RADIUS = 17.0

JUICES: dict[str, Color] = {
    "orange": (236, 128, 22),
    "cherry": (130, 12, 32),
    "banana": (232, 210, 118),
}
MURKY: Color = (105, 112, 45)
LABEL: Color = (238, 236, 228)
INK: Color = (58, 58, 62)


def half_width(y: np.ndarray) -> np.ndarray:
    """Outer half-width of the glass at height ``y`` (neck, eased shoulder, body)."""
    t = np.clip((y - SHOULDER_TOP) / (SHOULDER_BOTTOM - SHOULDER_TOP), 0, 1)
    return NECK_HALF + (BODY_HALF - NECK_HALF) * (1 - np.cos(np.pi * t)) / 2


def _mirror(right: np.ndarray) -> np.ndarray:
    """Close a right-hand outline (top to bottom) with its mirror image."""
    return np.concatenate([right, right[::-1] * (-1, 1) + (2 * CENTER_X, 0)])


def _band(top: float, bottom: float, inset: float) -> np.ndarray:
    """The bottle's inside between heights ``top`` and ``bottom`` (no bottom rounding)."""
    y = np.linspace(top, bottom, 40)
    return _mirror(np.stack([CENTER_X + half_width(y) - inset, y], 1))


def _outline(top: float, inset: float) -> np.ndarray:
    """Outline of the bottle from ``top`` down, ``inset`` inside the glass, rounded at the foot."""
    r = 8.0
    y = np.linspace(top, BOTTOM - inset - r, 40)
    w = half_width(y) - inset
    t = np.linspace(0, np.pi / 2, 6)
    foot = np.stack([CENTER_X + w[-1] - r + r * np.cos(t), BOTTOM - inset - r + r * np.sin(t)], 1)
    return _mirror(np.concatenate([np.stack([CENTER_X + w, y], 1), foot]))


def juice_region(top: float) -> np.ndarray:
    return _outline(max(top, NECK_TOP), GLASS)


def icon(fruit: str, center: tuple[float, float], rng: np.random.Generator) -> list[Shape]:
    """The fruit drawing of the top label."""
    cx, cy = center
    green, r = (70, 140, 50), ICON_RADIUS
    if fruit == "orange":
        body = Polygon(
            ellipse_points(center, (r * 0.85, r * 0.85)), vary(rng, (238, 135, 25), 0.03)
        )
        segments = [
            Stroke(
                np.array([center, (cx + 0.6 * r * np.cos(a), cy + 0.6 * r * np.sin(a))]),
                0.9,
                (250, 190, 90),
            )
            for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)
        ]
        leaf = Polygon(ellipse_points((cx + 4, cy - r * 0.9), (6.0, 2.6), -0.5), green)
        return [body, *segments, leaf]
    if fruit == "cherry":
        red = vary(rng, (175, 22, 42), 0.03)
        stems = [
            Stroke(
                np.array([(cx + dx, cy + 5), (cx + dx * 0.3, cy - 6), (cx + 2, cy - r * 0.95)]),
                1.2,
                green,
            )
            for dx in (-7.0, 7.0)
        ]
        fruits = [Polygon(ellipse_points((cx + dx, cy + 6), (7.5, 7.5)), red) for dx in (-7.0, 7.0)]
        shine = [
            Polygon(ellipse_points((cx + dx - 2.5, cy + 3.5), (1.8, 1.4)), (250, 200, 200))
            for dx in (-7.0, 7.0)
        ]
        return [*stems, *fruits, *shine]
    outer = ellipse_points((cx, cy - 4), (r, r * 0.9), 0.0, 40)[:21]  # lower half of an ellipse
    inner = ellipse_points((cx, cy - 8), (r * 0.85, r * 0.6), 0.0, 40)[:21][::-1]
    yellow = vary(rng, (240, 205, 60), 0.03)
    tips = [
        Polygon(ellipse_points(tuple(p), (2.0, 2.0)), (110, 80, 30)) for p in (outer[0], outer[-1])
    ]
    return [Polygon(np.concatenate([outer, inner]), yellow), *tips]


def _label(
    center: tuple[float, float], size: tuple[float, float], angle: float, content: list[Shape]
) -> tuple[Polygon, list[Shape]]:
    """A paper label and what is printed on it (already positioned)."""
    paper = Polygon(rounded_rect_points(center, size, 3.0, angle), LABEL)
    return paper, [paper, *content]


def _text_lines(
    center: tuple[float, float], width: float, rows: list[float], rng: np.random.Generator
) -> list[Shape]:
    """Printed text as dark bars, one per row offset in ``rows``."""
    cx, cy = center
    bars: list[Shape] = []
    for k, dy in enumerate(rows):
        w = width * (1.0 if k == 0 else rng.uniform(0.55, 0.8))
        bars.append(Polygon(rect_points((cx, cy + dy), (w, 4.5 if k == 0 else 2.4)), INK))
    return bars


def _nominal(which: tuple[tuple[float, float], tuple[float, float]]) -> list[Shape]:
    return [Polygon(rounded_rect_points(which[0], which[1], 3.0), LABEL)]


DEFECT_TYPES = (
    logical_absolute("missing_top_label", lambda: _nominal(TOP_LABEL)),
    logical_absolute("missing_bottom_label", lambda: _nominal(BOTTOM_LABEL)),
    logical("swapped_labels"),
    logical("wrong_fill_level_too_much"),
    logical("wrong_fill_level_not_enough"),
    logical("wrong_juice_type"),
    logical("empty_bottle"),
    structural("damaged_label"),
    structural("juice_color"),
    structural("incomplete_fruit_icon"),
    structural("contamination"),
)


def build_scene(rng: np.random.Generator, defect: str | None) -> Scene:
    check_defect("juice_bottle", defect, DEFECT_TYPES)
    fruit = str(rng.choice(list(JUICES)))
    juice_name: str | None = fruit
    if defect == "wrong_juice_type":
        juice_name = str(rng.choice([f for f in JUICES if f != fruit]))
    elif defect == "empty_bottle":
        juice_name = None
    juice_color = vary(rng, JUICES[juice_name], 0.04) if juice_name else None
    if defect == "juice_color":
        juice_color = mix(JUICES[fruit], MURKY, rng.uniform(0.45, 0.6))
        juice_name = "off"
    fill = FILL_Y + rng.uniform(-1.5, 1.5)
    fill = {
        "wrong_fill_level_too_much": TOO_MUCH_Y,
        "wrong_fill_level_not_enough": NOT_ENOUGH_Y,
    }.get(defect, fill)

    glass = Polygon(_outline(NECK_TOP, 0.0), (200, 212, 220, 55))
    shapes: list[Shape] = [Polygon(glass.points + np.array((3.0, 3.0)), (0, 0, 0, 60)), glass]
    juice = Polygon(juice_region(fill), juice_color) if juice_color else None
    if juice:
        surface = juice.points[np.argsort(juice.points[:, 1])[:2]]
        shapes += [
            juice,
            Stroke(surface[np.argsort(surface[:, 0])], 1.2, mix(juice_color, (255, 255, 255), 0.3)),
        ]
    shapes.append(Stroke(np.vstack([glass.points, glass.points[:1]]), 1.4, (150, 162, 172)))
    for dx, width in ((-30.0, 4.0), (-22.0, 1.6)):  # reflections on the glass
        shapes.append(
            Stroke(
                np.array([[CENTER_X + dx, SHOULDER_BOTTOM + 6], [CENTER_X + dx, BOTTOM - 14]]),
                width,
                (255, 255, 255, 60),
            )
        )
    cap = Polygon(rounded_rect_points((CENTER_X, 24.0), (34.0, 20.0), 3.0), (214, 214, 210))
    ridges = [
        Stroke(np.array([[CENTER_X + dx, 16.0], [CENTER_X + dx, 32.0]]), 1.0, (170, 170, 168))
        for dx in np.arange(-13, 14, 4.0)
    ]
    shapes += [cap, *ridges]

    angle = np.deg2rad(rng.uniform(-1.0, 1.0))
    jitter = [rng.uniform(-1.0, 1.0, 2) * (1.0, 1.5) for _ in range(2)]
    top_c = tuple(np.array(TOP_LABEL[0]) + jitter[0])
    bottom_c = tuple(np.array(BOTTOM_LABEL[0]) + jitter[1])
    top_size, bottom_size = TOP_LABEL[1], BOTTOM_LABEL[1]
    if defect == "swapped_labels":
        top_c, bottom_c = (
            (bottom_c[0], BOTTOM_LABEL[0][1] - 4.0 + jitter[1][1]),
            (top_c[0], TOP_LABEL[0][1] + jitter[0][1]),
        )
    icon_c = (top_c[0], top_c[1] - 4.0)
    fruit_icon = icon(fruit, icon_c, rng)
    top_print = [*fruit_icon, *_text_lines((top_c[0], top_c[1] + 21.0), 44.0, [0.0], rng)]
    bottom_print = _text_lines((bottom_c[0], bottom_c[1] - 8.0), 50.0, [0.0, 8.0, 14.0], rng)
    top_paper, top_shapes = _label(top_c, top_size, angle, top_print)
    bottom_paper, bottom_shapes = _label(bottom_c, bottom_size, angle, bottom_print)

    channels: list[Channel] = []
    labels: list[Shape] = []
    if defect != "missing_top_label":
        labels += top_shapes
    if defect != "missing_bottom_label":
        labels += bottom_shapes
    shapes += labels
    visible_paper = [
        p
        for p, missing in ((top_paper, "missing_top_label"), (bottom_paper, "missing_bottom_label"))
        if defect != missing
    ]
    if defect == "missing_top_label":
        channels.append(Channel(defect, [top_paper]))
    elif defect == "missing_bottom_label":
        channels.append(Channel(defect, [bottom_paper]))
    elif defect == "swapped_labels":
        nominal = _nominal(TOP_LABEL) + _nominal(BOTTOM_LABEL)
        channels.append(Channel(defect, [top_paper, bottom_paper, *nominal]))
    elif defect in ("wrong_fill_level_too_much", "wrong_fill_level_not_enough"):
        band = _band(min(fill, FILL_Y), max(fill, FILL_Y), GLASS)
        channels.append(Channel(defect, [region(band)], exclude=visible_paper))
    elif defect in ("wrong_juice_type", "juice_color", "empty_bottle"):
        channels.append(Channel(defect, [region(juice_region(FILL_Y))], exclude=visible_paper))
    elif defect == "incomplete_fruit_icon":
        start = rng.uniform(0, 2 * np.pi)
        t = np.linspace(start, start + rng.uniform(0.6, 0.9) * np.pi, 12)
        r = ICON_RADIUS + 2.0
        wedge = np.vstack(
            [icon_c, np.stack([icon_c[0] + r * np.cos(t), icon_c[1] + r * np.sin(t)], 1)]
        )
        shapes.append(Polygon(wedge, LABEL))
        channels.append(
            Channel(
                defect, [region(ellipse_points(icon_c, (ICON_RADIUS + 1.0, ICON_RADIUS + 1.0)))]
            )
        )
    elif defect == "damaged_label":
        corner = top_paper.points[int(rng.choice([0, 6, 12, 18]))]  # one of the rounded corners
        tear = blob_points(rng, tuple(corner), rng.uniform(9.0, 13.0), 0.5, 14)
        behind = juice_color or (70, 74, 80)
        shapes += [
            Polygon(tear, shade(behind, 0.9)),
            Stroke(np.vstack([tear, tear[:1]]), 1.3, (200, 198, 190)),
        ]
        channels.append(Channel(defect, [region(tear)]))
    elif defect == "contamination":
        for _ in range(1 if rng.random() < 0.7 else 2):
            spot = (CENTER_X + rng.uniform(-32, 32), rng.uniform(SHOULDER_BOTTOM + 6, BOTTOM - 12))
            dirt = contamination(rng, spot, rng.uniform(4.0, 6.5))
            shapes += dirt
            channels.append(Channel(defect, dirt))

    placed_labels = [
        (y, kind)
        for kind, y, missing in (
            ("fruit", top_c[1], "missing_top_label"),
            ("text", bottom_c[1], "missing_bottom_label"),
        )
        if defect != missing
    ]
    facts = {
        "icon": fruit,
        "icon_complete": defect != "incomplete_fruit_icon",
        "juice": juice_name,
        "fill_level": fill,
        "labels_top_to_bottom": [kind for _, kind in sorted(placed_labels)],
    }
    return Scene(shapes, channels, facts)


CATEGORY = CategoryDef(
    name="juice_bottle",
    design_size=SIZE,
    defect_types=DEFECT_TYPES,
    build_scene=build_scene,
    backdrop_color=(42, 42, 48),
    backdrop_texture=0.12,
    jitter_angle=np.deg2rad(1.5),
    jitter_shift=3.0,
    description="a juice bottle filled to the shoulder whose top label's fruit icon matches the juice",
)
