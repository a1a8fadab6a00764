"""splicing_connectors: two splicing connectors joined by one cable.

Rules: both connectors have the same number of clamps (2, 3 or 5) and the same lever colour
(orange or grey); the cable colour belongs to the size (2 yellow, 3 blue, 5 red); the cable enters
the same clamp on both sides and hangs at a fixed span. Good images vary the connector size, the
lever colour, the clamp used, the cable's sag and the pose.
"""

from __future__ import annotations

import numpy as np

from engine.data.synthetic.scene import (
    CategoryDef,
    Channel,
    Part,
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
    bezier_points,
    contamination,
    ellipse_points,
    mix,
    rect_points,
    rounded_rect_points,
    shade,
    shadow,
    vary,
)

SIZE = (340, 170)
CLAMP_PITCH = 16.0
BODY_WIDTH = 46.0
CENTER_X = (58.0, 282.0)  # left, right connector centres
CENTER_Y = 85.0
SHORT_SHIFT = 34.0  # how much closer the connectors sit when the cable is too short
CABLE_WIDTH = 7.0
CABLE_COLORS: dict[int, Color] = {2: (226, 196, 40), 3: (45, 95, 190), 5: (196, 46, 46)}
BODY: Color = (226, 229, 233)
BODY_EDGE: Color = (118, 123, 130)
# the connector variants: both connectors of a good image have one of these lever colours
LEVERS: dict[str, Color] = {"orange": (236, 126, 36), "grey": (128, 133, 141)}
# lever colours no good image has (the structural ``color`` defect)
OFF_LEVERS: dict[str, Color] = {
    "green": (70, 150, 70),
    "purple": (150, 60, 170),
    "teal": (40, 150, 160),
}
COPPER: Color = (204, 122, 60)


def body_height(n_clamps: int) -> float:
    return n_clamps * CLAMP_PITCH + 8.0


def port(side: int, center: tuple[float, float], n_clamps: int, slot: int) -> np.ndarray:
    """Where a cable enters clamp ``slot`` on the inner face of connector ``side`` (0 left)."""
    cx, cy = center
    x = cx + BODY_WIDTH / 2 if side == 0 else cx - BODY_WIDTH / 2
    return np.array([x, cy - body_height(n_clamps) / 2 + 4.0 + (slot + 0.5) * CLAMP_PITCH])


def connector(
    side: int,
    center: tuple[float, float],
    n_clamps: int,
    plugged: set[int],
    lever_color: Color,
    open_lever: int | None = None,
) -> tuple[Part, list[Shape], list[Shape]]:
    """A connector seen from above: transparent body, one orange lever per clamp on the outer
    half, ports on the inner face, stripped copper visible in ``plugged`` clamps. Returns the part,
    the silhouette of its levers, and that of ``open_lever`` in both its open and closed place."""
    cx, _ = center
    h = body_height(n_clamps)
    outward = -1.0 if side == 0 else 1.0
    body = Polygon(rounded_rect_points(center, (BODY_WIDTH, h), 4.0), BODY)
    edge = Stroke(np.vstack([body.points, body.points[:1]]), 1.3, BODY_EDGE)
    paint: list[Shape] = [shadow(body, (2.0, 2.5), 80), body, edge]
    levers: list[Shape] = []
    open_region: list[Shape] = []
    for k in range(n_clamps):
        py = port(side, center, n_clamps, k)[1]
        lever_c = (cx + outward * BODY_WIDTH * 0.22, py)
        closed = Polygon(rect_points(lever_c, (BODY_WIDTH * 0.5, CLAMP_PITCH - 4.5)), lever_color)
        lever = closed
        if k == open_lever:
            # flipped up: it now sticks out past the outer face, seen foreshortened and brighter
            lever = Polygon(
                rect_points((cx + outward * (BODY_WIDTH / 2 + 6.0), py), (22.0, CLAMP_PITCH - 3.0)),
                mix(lever_color, (255, 255, 255), 0.2),
            )
            paint.append(shadow(lever, (2.5, 3.0), 90))
            open_region += [closed, lever]
        grip = Stroke(
            np.array(
                [[lever_c[0] + outward * 5.5, py - 3.5], [lever_c[0] + outward * 5.5, py + 3.5]]
            ),
            1.2,
            shade(lever_color, 0.7),
        )
        hole = Polygon(
            rect_points((cx - outward * (BODY_WIDTH / 2 - 5.0), py), (9.0, 6.5)), (70, 72, 78)
        )
        paint += [lever, hole] if k == open_lever else [lever, grip, hole]
        levers.append(lever)
        if k in plugged:
            wire = np.array([[cx - outward * (BODY_WIDTH / 2 - 1.0), py], [cx - outward * 2.0, py]])
            paint.append(Stroke(wire, 2.6, COPPER))
    return Part(paint, [body, *levers]), levers, open_region


def cable_path(start: np.ndarray, end: np.ndarray, sag: float, n: int = 40) -> np.ndarray:
    """``(n, 2)`` centre line from port to port: a cubic curve that bulges by ``sag``."""
    span = end - start
    c1 = start + np.array([span[0] * 0.35, sag])
    c2 = end + np.array([-span[0] * 0.35, sag])
    return bezier_points(np.array([start, c1, c2, end]), n)


def cable(path: np.ndarray, color: Color) -> Part:
    outline = Stroke(path, CABLE_WIDTH + 1.6, shade(color, 0.55))
    core = Stroke(path, CABLE_WIDTH, color)
    gloss = Stroke(path + np.array((-0.6, -1.6)), 1.4, mix(color, (255, 255, 255), 0.45))
    paint = [Stroke(path + np.array((2.0, 3.0)), CABLE_WIDTH, (0, 0, 0, 55)), outline, core, gloss]
    return Part(paint, [outline])


def _nominal_cable() -> list[Shape]:
    start = port(0, (CENTER_X[0], CENTER_Y), 3, 1)
    return cable(
        cable_path(start, port(1, (CENTER_X[1], CENTER_Y), 3, 1), 0.0), CABLE_COLORS[3]
    ).silhouette


WRONG_TYPES = {
    "wrong_connector_type_5_2": (5, 2),
    "wrong_connector_type_5_3": (5, 3),
    "wrong_connector_type_3_2": (3, 2),
}
TOO_SHORT = {"cable_too_short_T2": 2, "cable_too_short_T3": 3, "cable_too_short_T5": 5}

DEFECT_TYPES = (
    *(logical(name) for name in WRONG_TYPES),
    *(logical(name) for name in TOO_SHORT),
    logical("missing_connector"),
    logical_absolute("missing_cable", _nominal_cable),
    logical("extra_cable", relative=0.5),
    logical("cable_color"),
    logical("wrong_cable_location"),
    # neither connector alone is wrong: both are annotated, and finding either one saturates
    logical("mixed_connector_colors", relative=0.5),
    structural("broken_cable"),
    structural("cable_not_plugged"),
    structural("open_lever"),
    structural("color"),
    structural("contamination"),
)


def _broken(
    path: np.ndarray, color: Color, rng: np.random.Generator
) -> tuple[list[Shape], list[Shape]]:
    """The cable torn open in the middle: two insulated pieces and splayed copper strands."""
    i = int(rng.integers(len(path) * 3 // 10, len(path) * 7 // 10))
    a, b = path[: i - 2], path[i + 2 :]
    gap = path[i - 3 : i + 4]
    strands: list[Shape] = [
        Stroke(gap + rng.uniform(-2.0, 2.0, gap.shape), 0.9, shade(COPPER, rng.uniform(0.85, 1.15)))
        for _ in range(4)
    ]
    paint = cable(a, color).paint + cable(b, color).paint + strands
    center = tuple(path[i])
    return paint, [region(ellipse_points(center, (11.0, 11.0)))]


def build_scene(rng: np.random.Generator, defect: str | None) -> Scene:
    check_defect("splicing_connectors", defect, DEFECT_TYPES)
    n = int(rng.choice([2, 3, 5]))
    lever_variant = str(rng.choice(list(LEVERS)))
    if defect in TOO_SHORT:
        n = TOO_SHORT[defect]
    clamps = [n, n]
    if defect in WRONG_TYPES:
        clamps = list(WRONG_TYPES[defect])
        if rng.random() < 0.5:
            clamps.reverse()
    color_type = clamps[int(rng.integers(2))]
    if defect == "cable_color":
        color_type = int(rng.choice([t for t in CABLE_COLORS if t != n]))
    slot = int(rng.integers(min(clamps)))
    slots = [slot, slot]
    if defect == "wrong_cable_location":
        slots[1] = int(rng.choice([k for k in range(n) if k != slot]))
    shift = SHORT_SHIFT if defect in TOO_SHORT else 0.0
    centers = [
        (CENTER_X[0] + shift + rng.uniform(-4, 4), CENTER_Y + rng.uniform(-8, 8)),
        (CENTER_X[1] - shift + rng.uniform(-4, 4), CENTER_Y + rng.uniform(-8, 8)),
    ]
    target = int(rng.integers(2))  # the connector or cable end a defect acts on
    present = [not (defect == "missing_connector" and side == target) for side in (0, 1)]
    has_cable = defect != "missing_cable"
    sag = (
        4.0 * rng.uniform(-1, 1)
        if defect in TOO_SHORT
        else rng.choice([-1, 1]) * rng.uniform(14, 32)
    )
    color = vary(rng, CABLE_COLORS[color_type], 0.04)
    start, end = port(0, centers[0], clamps[0], slots[0]), port(1, centers[1], clamps[1], slots[1])
    path = cable_path(start, end, sag)
    unplugged = defect == "cable_not_plugged"
    if unplugged or not all(present):  # pull the free end out of its (absent) port
        cut = int(np.searchsorted(np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1)), 14.0))
        path = path[cut:] if target == 0 else path[::-1][cut:][::-1]

    extra_slots = None
    if defect == "extra_cable":
        free = [k for k in range(n) if k != slot]
        extra_slots = (int(rng.choice(free)), int(rng.choice(free)))
    plugged = [{slots[0]}, {slots[1]}] if has_cable else [set(), set()]
    if unplugged:
        plugged[target] = set()
    if extra_slots is not None:
        plugged[0].add(extra_slots[0])
        plugged[1].add(extra_slots[1])

    shapes: list[Shape] = []
    channels: list[Channel] = []
    open_lever = int(rng.integers(n)) if defect == "open_lever" else None
    lever_names = [lever_variant, lever_variant]
    if defect == "mixed_connector_colors":  # a lever colour that is right in other images
        lever_names[target] = next(c for c in LEVERS if c != lever_variant)
    elif defect == "color":  # a lever colour that no image has
        lever_names[target] = str(rng.choice(list(OFF_LEVERS)))
    silhouettes: list[list[Shape]] = []
    all_levers: list[Shape] = []
    for side in (0, 1):
        part, levers, open_region = connector(
            side,
            centers[side],
            clamps[side],
            plugged[side],
            vary(rng, {**LEVERS, **OFF_LEVERS}[lever_names[side]], 0.04),
            open_lever if side == target else None,
        )
        silhouettes.append(part.silhouette)
        all_levers += levers
        if present[side]:
            shapes += part.paint
        if side == target and defect == "color":
            channels.append(Channel(defect, levers))
        if side == target and defect == "open_lever":
            channels.append(Channel(defect, open_region))
        if not present[side]:
            channels.append(Channel(defect, part.silhouette))
    if defect == "mixed_connector_colors":
        channels.append(Channel(defect, all_levers))
    if defect in WRONG_TYPES:
        odd = 0 if clamps[0] != color_type else 1
        channels.append(Channel(defect, silhouettes[odd]))

    wire = cable(path, color)
    if defect == "broken_cable":
        paint, silhouette = _broken(path, color, rng)
        shapes += paint
        channels.append(Channel(defect, silhouette))
    elif has_cable:
        shapes += wire.paint
    else:
        channels.append(Channel(defect, wire.silhouette))
    if unplugged or not all(present):  # bared copper at the free end
        tip = path[0] if target == 0 else path[-1]
        inward = (path[1] - path[0]) if target == 0 else (path[-2] - path[-1])
        inward = inward / np.linalg.norm(inward)
        shapes.append(Stroke(np.array([tip, tip - 6.0 * inward]), 2.6, COPPER))
        if unplugged:
            hole = port(target, centers[target], clamps[target], slots[target])
            channels.append(
                Channel(defect, [Stroke(np.array([hole, tip]), CABLE_WIDTH + 5.0, (255,))])
            )
    if defect in ("cable_color", "wrong_cable_location") or defect in TOO_SHORT:
        region_shapes = wire.silhouette
        if defect in TOO_SHORT:  # the whole assembly sits wrongly
            region_shapes = region_shapes + silhouettes[0] + silhouettes[1]
        channels.append(Channel(defect, region_shapes))
    if extra_slots is not None:
        extra_path = cable_path(
            port(0, centers[0], n, extra_slots[0]),
            port(1, centers[1], n, extra_slots[1]),
            -sag * rng.uniform(0.5, 1.0),
        )
        extra = cable(extra_path, color)
        shapes += extra.paint
        channels.append(Channel(defect, extra.silhouette))
    if defect == "contamination":
        for _ in range(1 if rng.random() < 0.7 else 2):
            spot = (rng.uniform(110, 230), CENTER_Y + rng.choice([-1, 1]) * rng.uniform(45, 65))
            dirt = contamination(rng, spot, rng.uniform(4.5, 7.0))
            shapes += dirt
            channels.append(Channel(defect, dirt))

    facts = {
        "connectors": [c if p else None for c, p in zip(clamps, present)],
        "cables": ([(color_type, slots[0], slots[1])] if has_cable else [])
        + ([(color_type, *extra_slots)] if extra_slots else []),
        "lever_colors": [c if p else None for c, p in zip(lever_names, present)],
        "span": centers[1][0] - centers[0][0],
    }
    return Scene(shapes, channels, facts)


CATEGORY = CategoryDef(
    name="splicing_connectors",
    design_size=SIZE,
    defect_types=DEFECT_TYPES,
    build_scene=build_scene,
    backdrop_color=(186, 181, 170),
    backdrop_texture=0.045,
    jitter_angle=np.deg2rad(2.5),
    jitter_shift=4.0,
    description="two splicing connectors of equal size and lever colour joined by one cable of the "
    "matching colour",
)
