"""screw_bag: a transparent bag holding exactly one long screw, one short screw, two nuts and two
washers, lying at random positions and angles, all of one finish.

Good bags vary the finish (bright zinc or black oxide, the same for every part of a bag), the part
poses and the bag pose. Logical defects change a count or a screw length, or put one part of the
other finish into the bag; structural ones tear the bag, give a part a colour no bag has, break a
part, or add dirt. Missing parts are annotated as the whole bag interior (where they could lie).
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
    sample_separated,
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
    regular_polygon_points,
    rounded_rect_points,
    shade,
    shadow,
    vary,
)

SIZE = (320, 220)
BAG = (29.0, 23.0, 291.0, 201.0)  # x0, y0, x1, y1
SEAL_HEIGHT = 14.0
PARTS_AREA = (44.0, 46.0, 276.0, 188.0)  # where part centres may lie
LONG, SHORT, TOO_LONG, TOO_SHORT = 84.0, 58.0, 106.0, 38.0
SHAFT_WIDTH, HEAD_WIDTH, HEAD_LENGTH = 7.0, 13.0, 6.0
NUT_RADIUS, WASHER_RADIUS = 11.0, 10.5
GOOD_COUNTS = {"long_screw": 1, "short_screw": 1, "nut": 2, "washer": 2}

# the bag variants: every part of a good bag has one of these finishes, the same for all its parts
FINISHES: dict[str, Color] = {"zinc": (150, 155, 164), "black": (76, 78, 84)}
# colours no good bag has (the structural ``color`` defect)
OFF_COLORS: dict[str, Color] = {
    "brass": (190, 150, 60),
    "blue": (60, 95, 175),
    "red": (175, 55, 45),
}
METAL = FINISHES["zinc"]  # nominal parts, only their outlines matter
BAG_FILM: Color = (244, 246, 250, 95)
BAG_EDGE: Color = (165, 170, 178)
BACKDROP: Color = (196, 194, 188)


def screw(
    center: tuple[float, float],
    angle: float,
    length: float,
    color: Color,
    broken_at: float | None = None,
) -> Part:
    """A screw lying on its side, centred on its axis; ``broken_at`` (0..1 along the shaft from
    the head) snaps the tip end off and lets it lie a little apart."""
    c = np.asarray(center, dtype=np.float64)
    d = np.array([np.cos(angle), np.sin(angle)])
    head_c = c - (length / 2 - HEAD_LENGTH / 2) * d
    shaft_start, tip = c - (length / 2 - HEAD_LENGTH) * d, c + length / 2 * d
    pieces = [(shaft_start, tip, np.zeros(2))]
    if broken_at is not None:
        cut = shaft_start + broken_at * (tip - shaft_start)
        drift = 5.0 * d + 3.0 * np.array([-d[1], d[0]])
        pieces = [(shaft_start, cut - 1.0 * d, np.zeros(2)), (cut + 1.0 * d, tip, drift)]
    paint: list[Shape] = []
    silhouette: list[Shape] = []
    head = Polygon(
        rounded_rect_points(tuple(head_c), (HEAD_LENGTH, HEAD_WIDTH), 2.0, angle), shade(color, 0.9)
    )
    paint += [shadow(head), head]
    silhouette.append(head)
    for start, end, offset in pieces:
        start, end = start + offset, end + offset
        seg = np.linalg.norm(end - start)
        body_end = end - 5.0 * d if np.allclose(end - offset, tip) else end
        mid = (start + body_end) / 2
        shaft = Polygon(
            rect_points(tuple(mid), (np.linalg.norm(body_end - start), SHAFT_WIDTH), angle), color
        )
        pieces_shapes: list[Shape] = [shaft]
        if np.allclose(end - offset, tip):  # pointed tip
            n = np.array([-d[1], d[0]]) * SHAFT_WIDTH / 2
            pieces_shapes.append(Polygon(np.array([body_end + n, end, body_end - n]), color))
        thread_color = shade(color, 0.68)
        n_threads = int(seg // 3.2)
        threads = [
            Stroke(
                np.array(
                    [
                        start + (k + 0.5) * 3.2 * d + 3.2 * np.array([-d[1], d[0]]),
                        start + (k + 0.9) * 3.2 * d - 3.2 * np.array([-d[1], d[0]]),
                    ]
                ),
                0.9,
                thread_color,
            )
            for k in range(max(0, n_threads - 1))
        ]
        gloss = Stroke(
            np.array([start, body_end]) - 1.6 * np.array([-d[1], d[0]]),
            1.2,
            mix(color, (255, 255, 255), 0.45),
        )
        paint += [shadow(shaft), *pieces_shapes, *threads, gloss]
        silhouette += pieces_shapes
    return Part(paint, silhouette)


def nut(center: tuple[float, float], angle: float, color: Color, hole: Color) -> Part:
    body = Polygon(regular_polygon_points(center, NUT_RADIUS, 6, angle), color)
    bevel = Polygon(
        ellipse_points(center, (NUT_RADIUS * 0.82,) * 2), mix(color, (255, 255, 255), 0.12)
    )
    thread = Polygon(ellipse_points(center, (5.6, 5.6)), shade(color, 0.6))
    bore = Polygon(ellipse_points(center, (4.6, 4.6)), hole)
    return Part([shadow(body), body, bevel, thread, bore], [body])


def washer(center: tuple[float, float], color: Color, hole: Color) -> Part:
    body = Polygon(ellipse_points(center, (WASHER_RADIUS,) * 2), mix(color, (255, 255, 255), 0.1))
    ring = Stroke(
        np.vstack([ellipse_points(center, (7.8, 7.8)), ellipse_points(center, (7.8, 7.8))[:1]]),
        0.9,
        shade(color, 0.8),
    )
    bore = Polygon(ellipse_points(center, (4.8, 4.8)), hole)
    return Part([shadow(body), body, ring, bore], [body])


def _nominal(kind: str) -> list[Shape]:
    center = (160.0, 110.0)
    if kind == "long_screw":
        return screw(center, 0.0, LONG, METAL).silhouette
    if kind == "short_screw":
        return screw(center, 0.0, SHORT, METAL).silhouette
    if kind == "nut":
        return nut(center, 0.0, METAL, BACKDROP).silhouette
    return washer(center, METAL, BACKDROP).silhouette


DEFECT_TYPES = (
    logical("screw_too_long"),
    logical("screw_too_short"),
    logical_absolute("1_additional_short_screw", lambda: _nominal("short_screw")),
    logical_absolute("1_additional_nut", lambda: _nominal("nut")),
    logical_absolute("1_additional_washer", lambda: _nominal("washer")),
    logical_absolute("1_missing_long_screw", lambda: _nominal("long_screw")),
    logical_absolute("1_missing_nut", lambda: _nominal("nut")),
    logical_absolute("1_missing_washer", lambda: _nominal("washer")),
    logical("mixed_finishes"),
    structural("bag_broken"),
    structural("color"),
    structural("contamination"),
    structural("part_broken"),
)


def _footprint(
    kind: str, center: np.ndarray, angle: float, length: float
) -> tuple[np.ndarray, float]:
    if kind in ("long_screw", "short_screw"):
        d = np.array([np.cos(angle), np.sin(angle)])
        t = np.linspace(-length / 2, length / 2, max(2, int(length // 6)))
        return center + t[:, None] * d, HEAD_WIDTH / 2
    return center[None, :], NUT_RADIUS if kind == "nut" else WASHER_RADIUS


def _place(
    rng: np.random.Generator, items: list[tuple[str, float]]
) -> list[tuple[np.ndarray, float]]:
    """Random non-overlapping (centre, angle) for ``(kind, length)`` items, in order."""
    x0, y0, x1, y1 = PARTS_AREA
    for _ in range(30):
        placed, poses = [], []
        for kind, length in items:
            half = length / 2 if "screw" in kind else 0.0

            def propose(half: float = half) -> tuple[np.ndarray, float]:
                angle = rng.uniform(0, 2 * np.pi)
                ext = np.abs([np.cos(angle), np.sin(angle)]) * half
                x = rng.uniform(x0 + ext[0], x1 - ext[0])
                return np.array([x, rng.uniform(y0 + ext[1], y1 - ext[1])]), angle

            def footprint(pose, kind: str = kind, length: float = length):
                return _footprint(kind, pose[0], pose[1], length)

            pose = sample_separated(propose, footprint, placed, gap=4.0)
            if pose is None:
                break
            placed.append(footprint(pose))
            poses.append(pose)
        else:
            return poses
    raise RuntimeError(f"screw_bag: could not place {len(items)} parts without overlap")


def _tear(rng: np.random.Generator) -> tuple[list[Shape], list[Shape]]:
    """A torn hole in the film: dark slit with frayed bright edges, near a bag edge."""
    x0, y0, x1, y1 = BAG
    side = rng.integers(4)
    along = rng.uniform(0.2, 0.8)
    center = [
        (x0 + along * (x1 - x0), y1 - 6),
        (x0 + 6, y0 + SEAL_HEIGHT + along * (y1 - y0 - SEAL_HEIGHT)),
        (x1 - 6, y0 + SEAL_HEIGHT + along * (y1 - y0 - SEAL_HEIGHT)),
        (x0 + along * (x1 - x0), y1 - 6),
    ][side]
    outline = blob_points(rng, center, rng.uniform(9.0, 13.0), 0.55, 18)
    hole = Polygon(outline, (92, 90, 86))
    fray = Stroke(np.vstack([outline, outline[:1]]), 1.4, (250, 250, 250))
    return [hole, fray], [hole, fray]


def build_scene(rng: np.random.Generator, defect: str | None) -> Scene:
    check_defect("screw_bag", defect, DEFECT_TYPES)
    items = [
        ("long_screw", LONG),
        ("short_screw", SHORT),
        ("nut", 0.0),
        ("nut", 0.0),
        ("washer", 0.0),
        ("washer", 0.0),
    ]
    items = [(k, v + rng.uniform(-1.0, 1.0) if v else v) for k, v in items]
    finish = str(rng.choice(list(FINISHES)))
    extra_kind = {
        "1_additional_short_screw": "short_screw",
        "1_additional_nut": "nut",
        "1_additional_washer": "washer",
    }
    missing_kind = {
        "1_missing_long_screw": "long_screw",
        "1_missing_nut": "nut",
        "1_missing_washer": "washer",
    }
    if defect == "screw_too_long":
        items[0] = ("long_screw", TOO_LONG)
    elif defect == "screw_too_short":
        items[1] = ("short_screw", TOO_SHORT)
    elif defect in extra_kind:
        kind = extra_kind[defect]
        items.append((kind, SHORT if kind == "short_screw" else 0.0))
    elif defect in missing_kind:
        items.remove(next(it for it in items if it[0] == missing_kind[defect]))
    order = sorted(range(len(items)), key=lambda k: -items[k][1])
    poses = dict(zip(order, _place(rng, [items[k] for k in order])))

    x0, y0, x1, y1 = BAG
    bag_center, bag_size = ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0, y1 - y0)
    film = Polygon(rounded_rect_points(bag_center, bag_size, 12.0), BAG_FILM)
    seal = Polygon(
        rect_points((bag_center[0], y0 + SEAL_HEIGHT / 2 + 1), (x1 - x0 - 6, SEAL_HEIGHT)),
        (250, 250, 252, 120),
    )
    edge = Stroke(np.vstack([film.points, film.points[:1]]), 1.5, BAG_EDGE)
    shapes: list[Shape] = [shadow(film, (2.0, 3.0), 45), film, seal, edge]
    hole_color = mix(BACKDROP, (255, 255, 255), 0.25)
    channels: list[Channel] = []
    defect_part = int(rng.integers(len(items)))
    recoloured = defect in ("color", "mixed_finishes")
    finishes = [finish] * len(items)
    if defect == "mixed_finishes":  # a finish that is right in other bags
        finishes[defect_part] = next(f for f in FINISHES if f != finish)
    elif defect == "color":  # a colour that no bag has
        finishes[defect_part] = str(rng.choice(list(OFF_COLORS)))
    extra_shapes: list[Shape] = []
    for k, (kind, length) in enumerate(items):
        center, angle = poses[k]
        color = vary(rng, {**FINISHES, **OFF_COLORS}[finishes[k]], 0.03)
        if kind in ("long_screw", "short_screw"):
            broken = (
                rng.uniform(0.35, 0.7) if defect == "part_broken" and kind == "long_screw" else None
            )
            part = screw(tuple(center), angle, length, color, broken)
        elif kind == "nut":
            part = nut(tuple(center), angle, color, hole_color)
        else:
            part = washer(tuple(center), color, hole_color)
        shapes += part.paint
        if defect in extra_kind and k == len(items) - 1:
            extra_shapes += part.silhouette
        is_target = (recoloured and k == defect_part) or (
            defect == "part_broken" and kind == "long_screw"
        )
        is_target |= (defect == "screw_too_long" and kind == "long_screw") or (
            defect == "screw_too_short" and kind == "short_screw"
        )
        if is_target:
            channels.append(Channel(defect, part.silhouette))
    if extra_shapes:
        channels.append(Channel(defect, extra_shapes))
    if defect in missing_kind:
        px0, py0, px1, py1 = PARTS_AREA
        inner = rounded_rect_points(
            ((px0 + px1) / 2, (py0 + py1) / 2), (px1 - px0 + 20, py1 - py0 + 16), 8.0
        )
        channels.append(Channel(defect, [region(inner)]))
    for _ in range(int(rng.integers(3, 6))):  # creases in the film, over the parts
        a = np.array([rng.uniform(x0 + 10, x1 - 10), rng.uniform(y0 + SEAL_HEIGHT, y1 - 10)])
        b = a + rng.uniform(-45, 45, 2)
        shapes.append(
            Stroke(
                np.array([a, (a + b) / 2 + rng.uniform(-6, 6, 2), b]),
                rng.uniform(1.0, 2.2),
                (255, 255, 255, 70),
            )
        )
    if defect == "bag_broken":
        paint, silhouette = _tear(rng)
        shapes += paint
        channels.append(Channel(defect, silhouette))
    elif defect == "contamination":
        taken = [_footprint(items[k][0], *poses[k], items[k][1]) for k in range(len(items))]
        px0, py0, px1, py1 = PARTS_AREA
        for _ in range(1 if rng.random() < 0.7 else 2):
            spot = sample_separated(
                lambda: np.array([rng.uniform(px0, px1), rng.uniform(py0, py1)]),
                lambda p: (p[None, :], 7.0),
                taken,
                gap=2.0,
            )
            if spot is None:  # six parts leave ample room; this would be a geometry bug
                raise RuntimeError("screw_bag: no free spot for contamination")
            taken.append((spot[None, :], 7.0))
            dirt = contamination(rng, tuple(spot), rng.uniform(4.5, 7.0))
            shapes += dirt
            channels.append(Channel(defect, dirt))

    counts = {kind: sum(1 for k, _ in items if k == kind) for kind in GOOD_COUNTS}
    facts = {
        "counts": counts,
        "screw_lengths": sorted(length for kind, length in items if "screw" in kind),
        "finish": finish,
        "part_kinds": [kind for kind, _ in items],
        "part_finishes": finishes,
        "part_centers": [tuple(float(v) for v in poses[k][0]) for k in range(len(items))],
    }
    return Scene(shapes, channels, facts)


CATEGORY = CategoryDef(
    name="screw_bag",
    design_size=SIZE,
    defect_types=DEFECT_TYPES,
    build_scene=build_scene,
    backdrop_color=BACKDROP,
    backdrop_texture=0.06,
    jitter_angle=np.deg2rad(4.5),
    jitter_shift=5.0,
    description="a transparent bag with one long screw, one short screw, two nuts and two washers, "
    "all of one finish",
)
