"""breakfast_box: a two-compartment tray seen from above.

Rules: the left compartment holds exactly two tangerines and one nectarine; the right one holds
granola in its lower part and a mix of banana chips and almonds in its upper part. Good images vary
the fruit positions, sizes and ripeness (tangerines from yellow-orange to deep orange, nectarines
from yellow to orange with more or less blush), the granola's bake (light, golden or dark, one per
box), the granola clumps, the topping positions and the pose. Fruit colours overlap between the two
kinds; what tells them apart is size, blush, suture and dimples.
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
    rounded_rect_points,
    shade,
    shadow,
    vary,
)

SIZE = (320, 256)
BOX = (14.0, 20.0, 306.0, 236.0)  # outer x0, y0, x1, y1
WALL = 6.0
SEPARATOR_X = 160.0
LEFT = (BOX[0] + WALL, BOX[1] + WALL, SEPARATOR_X - WALL / 2, BOX[3] - WALL)  # compartment rects
RIGHT = (SEPARATOR_X + WALL / 2, BOX[1] + WALL, BOX[2] - WALL, BOX[3] - WALL)
TOPPING_SPLIT = 0.38  # granola starts this far down the cereal compartment
UNDERFLOW_SPLIT = 0.75
TANGERINE_R, NECTARINE_R = 25.0, 29.0
N_CHIPS, N_ALMONDS = 11, 12
GOOD_FRUIT = {"tangerine": 2, "nectarine": 1}

TRAY: Color = (232, 228, 218)
FLOOR: Color = (214, 206, 190)
# ripeness ranges: a fruit's skin is a random blend between the two ends
TANGERINE: tuple[Color, Color] = ((240, 156, 36), (226, 100, 22))
NECTARINE: tuple[Color, Color] = ((232, 186, 76), (226, 140, 56))
BLUSH: Color = (180, 38, 40)
GRANOLA: tuple[Color, ...] = ((176, 124, 66), (150, 98, 50), (204, 164, 106), (128, 84, 44))
# the box variants: how long the granola was baked, as a brightness factor on GRANOLA
BAKES: dict[str, float] = {"light": 1.12, "golden": 1.0, "dark": 0.8}
CORNFLAKES: tuple[Color, ...] = ((236, 196, 70), (214, 60, 50), (240, 220, 120))
CHIP: Color = (238, 222, 168)
ALMOND: Color = (150, 94, 52)


def _center(rect: tuple[float, float, float, float]) -> tuple[float, float]:
    return (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2


def _rect_polygon(rect: tuple[float, float, float, float]) -> np.ndarray:
    return rect_points(_center(rect), (rect[2] - rect[0], rect[3] - rect[1]))


def _bands(rect: tuple[float, float, float, float], split: float) -> tuple[tuple, tuple]:
    """The toppings band (above ``split`` of the height) and the granola band of ``rect``."""
    y = rect[1] + split * (rect[3] - rect[1])
    return (rect[0], rect[1], rect[2], y), (rect[0], y, rect[2], rect[3])


def fruit(kind: str, center: tuple[float, float], radius: float, rng: np.random.Generator) -> Part:
    """A tangerine (orange, dimpled, stem dot) or a nectarine (larger, red blush, suture line)."""
    cx, cy = center
    outline = ellipse_points(
        center, (radius, radius * rng.uniform(0.93, 1.0)), rng.uniform(0, np.pi), 36
    )
    if kind == "tangerine":
        skin = Polygon(outline, vary(rng, mix(*TANGERINE, rng.uniform()), 0.03))
        dots = [
            Polygon(
                ellipse_points((cx + r * np.cos(a), cy + r * np.sin(a)), (1.1, 1.1), 0.0, 6),
                shade(skin.fill, 0.86),
            )
            for a, r in zip(
                rng.uniform(0, 2 * np.pi, 14), radius * np.sqrt(rng.uniform(0.05, 0.7, 14))
            )
        ]
        a = rng.uniform(0, 2 * np.pi)
        stem = Polygon(
            ellipse_points(
                (cx + 0.2 * radius * np.cos(a), cy + 0.2 * radius * np.sin(a)), (3.0, 3.0)
            ),
            (96, 110, 40),
        )
        detail: list[Shape] = [*dots, stem]
    else:
        skin = Polygon(outline, vary(rng, mix(*NECTARINE, rng.uniform()), 0.03))
        a = rng.uniform(0, 2 * np.pi)
        blush_center = (cx + 0.25 * radius * np.cos(a), cy + 0.25 * radius * np.sin(a))
        spread = rng.uniform(0.6, 0.8)
        blush = Polygon(
            ellipse_points(blush_center, (spread * radius, 0.86 * spread * radius), a, 30),
            (*vary(rng, BLUSH, 0.05), int(rng.integers(160, 225))),
        )
        b = rng.uniform(0, np.pi)
        d = np.array([np.cos(b), np.sin(b)]) * 0.75 * radius
        n = np.array([-d[1], d[0]]) * 0.15
        suture = Stroke(np.array([center - d, center + n, center + d]), 1.3, shade(BLUSH, 0.6))
        detail = [blush, suture]
    highlight = Polygon(
        ellipse_points(
            (cx - 0.35 * radius, cy - 0.35 * radius), (0.28 * radius, 0.18 * radius), -0.7
        ),
        (255, 255, 255, 80),
    )
    return Part([shadow(skin, (2.5, 3.5), 80), skin, *detail, highlight], [skin])


def _nominal_fruit(*kinds: str) -> list[Shape]:
    rng = np.random.default_rng(0)  # only the outline matters; its details are not rasterised
    radius = {"tangerine": TANGERINE_R, "nectarine": NECTARINE_R}
    return [
        s
        for k, kind in enumerate(kinds)
        for s in fruit(kind, (80.0, 60.0 + 70 * k), radius[kind], rng).silhouette
    ]


DEFECT_TYPES = (
    logical("missing_almonds"),
    logical("missing_bananas"),
    logical("missing_toppings"),
    logical("missing_cereals"),
    logical("missing_cereals_and_toppings"),
    logical_absolute("2_nectarines_1_tangerine", lambda: _nominal_fruit("nectarine")),
    logical_absolute("1_nectarine_1_tangerine", lambda: _nominal_fruit("tangerine")),
    logical_absolute("0_nectarines_2_tangerines", lambda: _nominal_fruit("nectarine")),
    logical_absolute("0_nectarines_3_tangerines", lambda: _nominal_fruit("tangerine")),
    logical("compartments_swapped"),
    logical("overflow"),
    logical("underflow"),
    structural("mixed_cereals"),
    structural("fruit_damaged"),
    structural("box_damaged"),
    structural("contamination"),
)
# fruit defect -> the fruits the box holds instead of nectarine, tangerine, tangerine
FRUIT_DEFECTS = {
    "2_nectarines_1_tangerine": ["nectarine", "nectarine", "tangerine"],
    "1_nectarine_1_tangerine": ["nectarine", "tangerine"],
    "0_nectarines_2_tangerines": ["tangerine", "tangerine"],
    "0_nectarines_3_tangerines": ["tangerine", "tangerine", "tangerine"],
}


def _place_fruit(
    rng: np.random.Generator, rect: tuple[float, float, float, float], radii: list[float]
) -> list[np.ndarray]:
    """Non-overlapping fruit centres fully inside ``rect``, largest first."""
    for _ in range(30):
        placed, centres = [], []
        for r in radii:
            centre = sample_separated(
                lambda r=r: np.array(
                    [
                        rng.uniform(rect[0] + r + 2, rect[2] - r - 2),
                        rng.uniform(rect[1] + r + 2, rect[3] - r - 2),
                    ]
                ),
                lambda p, r=r: (p[None, :], r),
                placed,
                gap=2.0,
            )
            if centre is None:
                break
            placed.append((centre[None, :], r))
            centres.append(centre)
        else:
            return centres
    raise RuntimeError(f"breakfast_box: could not place {len(radii)} fruits without overlap")


def _granola(
    rng: np.random.Generator,
    rect: tuple[float, float, float, float],
    palette: tuple[Color, ...],
    density: float = 0.08,
) -> list[Shape]:
    """A bed of granola filling ``rect``: a base with a wavy top edge and clumps over it."""
    x0, y0, x1, y1 = rect
    xs = np.linspace(x0, x1, 14)
    top = y0 + rng.uniform(-2.5, 2.5, xs.size)
    top[[0, -1]] = y0
    base = Polygon(
        np.concatenate([np.stack([xs, top], 1), [[x1, y1], [x0, y1]]]), vary(rng, palette[0], 0.03)
    )
    # all clumps drawn at once: per-clump helpers would dominate the generation time
    n = int(density * (x1 - x0) * (y1 - y0) / 4)
    centres = np.stack([rng.uniform(x0 + 3, x1 - 3, n), rng.uniform(y0 + 3, y1 - 3, n)], 1)
    t = np.sort(rng.uniform(0, 2 * np.pi, (n, 8)), axis=1)
    r = rng.uniform(2.2, 4.0, (n, 1)) * (1 + 0.4 * rng.uniform(-1, 1, (n, 8)))
    outlines = centres[:, None, :] + np.stack([r * np.cos(t), r * np.sin(t)], 2)
    base_colors = np.array(palette, dtype=np.float64)[rng.integers(len(palette), size=n)]
    colors = np.clip(np.rint(base_colors * rng.uniform(0.94, 1.06, (n, 3))), 0, 255).astype(int)
    clumps: list[Shape] = [Polygon(o, tuple(c)) for o, c in zip(outlines, colors.tolist())]
    return [base, *clumps]


def _toppings(
    rng: np.random.Generator, rect: tuple[float, float, float, float], chips: bool, almonds: bool
) -> list[Shape]:
    """Banana chips and almonds strewn over ``rect`` in random paint order (they pile up)."""
    x0, y0, x1, y1 = rect
    items = ["chip"] * (N_CHIPS if chips else 0) + ["almond"] * (N_ALMONDS if almonds else 0)
    shapes: list[Shape] = []
    for kind in rng.permutation(np.array(items, dtype=object)):
        if kind == "chip":
            r = rng.uniform(6.5, 8.0)
            c = (rng.uniform(x0 + r + 1, x1 - r - 1), rng.uniform(y0 + r + 1, y1 - r - 1))
            disc = Polygon(
                ellipse_points(c, (r, r * rng.uniform(0.85, 1.0)), rng.uniform(0, np.pi), 16),
                vary(rng, CHIP, 0.04),
            )
            ring = Stroke(np.vstack([disc.points, disc.points[:1]]), 1.2, shade(disc.fill, 0.82))
            seeds = Polygon(ellipse_points(c, (1.6, 1.6), 0.0, 6), (150, 120, 80))
            shapes += [shadow(disc, (1.0, 1.5), 60), disc, ring, seeds]
        else:
            a = rng.uniform(0, np.pi)
            c = (rng.uniform(x0 + 7, x1 - 7), rng.uniform(y0 + 7, y1 - 7))
            nut = Polygon(ellipse_points(c, (6.5, 3.8), a, 14), vary(rng, ALMOND, 0.06))
            ridge = Stroke(ellipse_points(c, (4.0, 0.6), a, 4)[[2, 0]], 0.8, shade(nut.fill, 0.7))
            shapes += [shadow(nut, (1.0, 1.5), 60), nut, ridge]
    return shapes


def build_scene(rng: np.random.Generator, defect: str | None) -> Scene:
    check_defect("breakfast_box", defect, DEFECT_TYPES)
    swapped = defect == "compartments_swapped"
    fruit_rect, cereal_rect = (RIGHT, LEFT) if swapped else (LEFT, RIGHT)
    kinds = ["nectarine", "tangerine", "tangerine"]
    radii = [NECTARINE_R * rng.uniform(0.94, 1.06), *(TANGERINE_R * rng.uniform(0.93, 1.07, 2))]
    bake = str(rng.choice(list(BAKES)))
    granola = tuple(shade(c, BAKES[bake]) for c in GRANOLA)
    centres = _place_fruit(rng, fruit_rect, radii)
    parts = [fruit(k, tuple(c), r, rng) for k, c, r in zip(kinds, centres, radii)]
    channels: list[Channel] = []
    shown = [0, 1, 2]  # which of the fruits are painted
    if defect in FRUIT_DEFECTS:
        wanted = FRUIT_DEFECTS[defect]
        if len(wanted) < 3:  # a missing fruit is annotated where it would lie
            k = 2 if wanted.count("tangerine") < 2 else 0
            shown.remove(k)
        else:  # one fruit swapped for the other kind, in the same place
            k = 2 if wanted.count("nectarine") == 2 else 0
            kinds[k] = "tangerine" if kinds[k] == "nectarine" else "nectarine"
            radius = NECTARINE_R if kinds[k] == "nectarine" else TANGERINE_R
            radii[k] = radius * rng.uniform(0.95, 1.05)
            parts[k] = fruit(kinds[k], tuple(centres[k]), radii[k], rng)
        channels.append(Channel(defect, parts[k].silhouette))

    x0, y0, x1, y1 = BOX
    tray = Polygon(
        rounded_rect_points(_center(BOX), (x1 - x0, y1 - y0), 8.0), vary(rng, TRAY, 0.02)
    )
    floors = [Polygon(_rect_polygon(r), vary(rng, FLOOR, 0.02)) for r in (LEFT, RIGHT)]
    separator = Polygon(
        rect_points((SEPARATOR_X, _center(BOX)[1]), (WALL, y1 - y0 - 2 * WALL)), shade(TRAY, 1.03)
    )
    shapes: list[Shape] = [shadow(tray, (3.0, 4.0), 90), tray, *floors, separator]

    split = UNDERFLOW_SPLIT if defect == "underflow" else TOPPING_SPLIT
    toppings_band, _ = _bands(cereal_rect, TOPPING_SPLIT)
    _, granola_band = _bands(cereal_rect, split)
    has_cereal = defect not in ("missing_cereals", "missing_cereals_and_toppings")
    chips = defect not in ("missing_bananas", "missing_toppings", "missing_cereals_and_toppings")
    almonds = defect not in ("missing_almonds", "missing_toppings", "missing_cereals_and_toppings")
    if has_cereal:
        shapes += _granola(rng, granola_band, granola)
    shapes += _toppings(rng, toppings_band, chips, almonds)
    for k in shown:
        shapes += parts[k].paint

    nominal_granola = region(_rect_polygon(_bands(cereal_rect, TOPPING_SPLIT)[1]))
    if defect in ("missing_almonds", "missing_bananas", "missing_toppings"):
        channels.append(Channel(defect, [region(_rect_polygon(toppings_band))]))
    elif defect == "missing_cereals":
        channels.append(Channel(defect, [nominal_granola]))
    elif defect == "missing_cereals_and_toppings":
        channels.append(Channel(defect, [region(_rect_polygon(cereal_rect))]))
    elif swapped:
        channels.append(Channel(defect, [region(_rect_polygon(r)) for r in (LEFT, RIGHT)]))
    elif defect == "underflow":
        channels.append(
            Channel(defect, [nominal_granola], exclude=[region(_rect_polygon(granola_band))])
        )
    elif defect == "overflow":
        # granola heaped over the separator onto the fruit side
        centre = (
            SEPARATOR_X + rng.uniform(-6, 6),
            rng.uniform(cereal_rect[1] + 110, cereal_rect[3] - 24),
        )
        heap = Polygon(blob_points(rng, centre, rng.uniform(20, 26), 0.25, 18), granola[0])
        shapes.append(heap)
        bx0, by0 = heap.points.min(0)
        bx1, by1 = heap.points.max(0)
        shapes += _granola(rng, (bx0 + 6, by0 + 6, bx1 - 6, by1 - 6), granola, density=0.3)[1:]
        channels.append(Channel(defect, [region(heap.points)]))
    elif defect == "mixed_cereals":
        gx0, gy0, gx1, gy1 = granola_band
        centre = (rng.uniform(gx0 + 30, gx1 - 30), rng.uniform(gy0 + 30, gy1 - 30))
        patch = Polygon(blob_points(rng, centre, rng.uniform(18, 24), 0.2, 16), CORNFLAKES[0])
        px0, py0 = patch.points.min(0)
        px1, py1 = patch.points.max(0)
        flakes = _granola(rng, (px0 + 5, py0 + 5, px1 - 5, py1 - 5), CORNFLAKES, density=0.35)[1:]
        shapes += [patch, *flakes]
        channels.append(Channel(defect, [patch]))
    elif defect == "fruit_damaged":
        k = shown[int(rng.integers(len(shown)))]
        c, r = centres[k], radii[k]
        a = rng.uniform(0, 2 * np.pi)
        spot = tuple(c + rng.uniform(0.1, 0.45) * r * np.array([np.cos(a), np.sin(a)]))
        bruise = Polygon(
            blob_points(rng, spot, rng.uniform(7.0, 10.0), 0.3, 14), vary(rng, (96, 62, 34), 0.08)
        )
        shapes.append(bruise)
        channels.append(Channel(defect, [bruise]))
    elif defect == "box_damaged":
        side = int(rng.integers(4))
        t = rng.uniform(0.2, 0.8)
        spot = [
            (x0 + t * (x1 - x0), y0 + 2),
            (x0 + t * (x1 - x0), y1 - 2),
            (x0 + 2, y0 + t * (y1 - y0)),
            (x1 - 2, y0 + t * (y1 - y0)),
        ][side]
        tear = blob_points(rng, spot, rng.uniform(9.0, 12.0), 0.5, 16)
        shapes += [
            Polygon(tear, (96, 88, 76)),
            Stroke(np.vstack([tear, tear[:1]]), 1.4, (250, 248, 240)),
        ]
        channels.append(Channel(defect, [region(tear)]))
    elif defect == "contamination":
        for _ in range(1 if rng.random() < 0.7 else 2):
            rect = (LEFT, RIGHT)[int(rng.integers(2))]
            spot = (
                rng.uniform(rect[0] + 10, rect[2] - 10),
                rng.uniform(rect[1] + 10, rect[3] - 10),
            )
            dirt = contamination(rng, spot, rng.uniform(4.5, 6.5))
            shapes += dirt
            channels.append(Channel(defect, dirt))

    facts = {
        "fruit_counts": {kind: [kinds[k] for k in shown].count(kind) for kind in GOOD_FRUIT},
        "fruit_side": "right" if swapped else "left",
        "cereal": has_cereal,
        "granola_top_fraction": split,
        "granola_bake": bake,
        "banana_chips": N_CHIPS if chips else 0,
        "almonds": N_ALMONDS if almonds else 0,
    }
    return Scene(shapes, channels, facts)


CATEGORY = CategoryDef(
    name="breakfast_box",
    design_size=SIZE,
    defect_types=DEFECT_TYPES,
    build_scene=build_scene,
    backdrop_color=(60, 62, 66),
    backdrop_texture=0.10,
    jitter_angle=np.deg2rad(1.5),
    jitter_shift=3.0,
    description="a tray with two tangerines and a nectarine on the left, granola topped with banana chips and almonds on the right",
)
