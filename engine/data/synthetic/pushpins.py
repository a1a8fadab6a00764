"""pushpins: a box of 5 x 3 compartments seen from above, exactly one pin in each.

Rules: one pin per compartment, and all pins of a box share one colour. Good images vary the box
colour (yellow, blue or green pins), the pin positions and orientations inside their compartments,
the shade of each pin a little, and the box pose. Logical defects break the one-pin-per-compartment
rule, remove a separator, or put one pin of another box's colour into the box; structural ones
damage one pin, give it a colour no box has, or add dirt.
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
    structural,
)
from engine.data.synthetic.shapes import (
    Color,
    Polygon,
    Shape,
    Stroke,
    contamination,
    ellipse_points,
    mix,
    rect_points,
    rounded_rect_points,
    shade,
    shadow,
    vary,
)

SIZE = (340, 200)
ROWS, COLS = 3, 5
BOX = (18.0, 14.0, 322.0, 186.0)  # outer x0, y0, x1, y1
WALL = 5.0
INNER = (BOX[0] + WALL, BOX[1] + WALL, BOX[2] - WALL, BOX[3] - WALL)
CELL_W = (INNER[2] - INNER[0]) / COLS
CELL_H = (INNER[3] - INNER[1]) / ROWS
SEPARATOR_WIDTH = 3.0
HEAD_RADIUS = 7.5
NEEDLE_LENGTH = 13.0

# the box variants: every pin of a good box has one of these colours, the same for all its pins
PIN_COLORS: dict[str, Color] = {
    "yellow": (228, 188, 36),
    "blue": (45, 110, 210),
    "green": (60, 160, 75),
}
# colours no good box has (the structural ``color`` defect)
OFF_COLORS: dict[str, Color] = {
    "red": (200, 45, 45),
    "white": (235, 235, 235),
    "purple": (150, 60, 170),
}
PIN_SHADE = 0.04  # per-pin colour jitter within a box
NEEDLE: Color = (208, 208, 214)
BOX_RIM: Color = (196, 200, 207)
FLOOR: Color = (142, 148, 157)
SEPARATOR: Color = (200, 204, 210)


def cell_rect(index: int) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of compartment ``index`` (row-major)."""
    r, c = divmod(index, COLS)
    x0, y0 = INNER[0] + c * CELL_W, INNER[1] + r * CELL_H
    return x0, y0, x0 + CELL_W, y0 + CELL_H


def separator_segments() -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Every inner wall piece between two neighbouring compartments, as ``(start, end)``."""
    segments = []
    for c in range(1, COLS):
        x = INNER[0] + c * CELL_W
        segments += [
            ((x, INNER[1] + r * CELL_H), (x, INNER[1] + (r + 1) * CELL_H)) for r in range(ROWS)
        ]
    for r in range(1, ROWS):
        y = INNER[1] + r * CELL_H
        segments += [
            ((INNER[0] + c * CELL_W, y), (INNER[0] + (c + 1) * CELL_W, y)) for c in range(COLS)
        ]
    return segments


def _segment_rect(
    segment: tuple[tuple[float, float], tuple[float, float]], width: float
) -> np.ndarray:
    (x0, y0), (x1, y1) = segment
    size = (abs(x1 - x0) + width, abs(y1 - y0) + width)
    return rect_points(((x0 + x1) / 2, (y0 + y1) / 2), size)


def pin(
    center: tuple[float, float],
    angle: float,
    head_color: Color,
    needle: str = "straight",
    rng: np.random.Generator | None = None,
) -> Part:
    """A pin seen from above: needle, plastic body, head. ``needle`` is ``straight``, ``bent``
    (tip bent sideways) or ``broken`` (needle snapped off and a chip out of the head; needs
    ``rng``)."""
    c = np.asarray(center, dtype=np.float64)
    direction = np.array([np.cos(angle), np.sin(angle)])
    root = c + 4.0 * direction
    if needle == "bent":
        kink = c + (4.0 + 0.45 * NEEDLE_LENGTH) * direction
        turn = angle + (1 if rng is None or rng.random() < 0.5 else -1) * np.deg2rad(75)
        tip = kink + 0.75 * NEEDLE_LENGTH * np.array([np.cos(turn), np.sin(turn)])
        needle_pts = np.array([root, kink, tip])
    elif needle == "broken":
        needle_pts = np.array([root, c + 7.0 * direction])
    else:
        needle_pts = np.array([root, c + (4.0 + NEEDLE_LENGTH) * direction])
    head_pts = ellipse_points(center, (HEAD_RADIUS, HEAD_RADIUS), 0.0, 32)
    if needle == "broken" and rng is not None:
        # a jagged chip out of the rim, on a random side
        start = rng.integers(0, 32)
        chip = np.arange(start, start + 9) % 32
        depth = rng.uniform(0.35, 0.65, chip.size)
        head_pts[chip] = c + (head_pts[chip] - c) * depth[:, None]
    needle_shape = Stroke(needle_pts, 1.8, NEEDLE)
    body = Polygon(ellipse_points(tuple(c + 2.5 * direction), (5.5, 5.5)), shade(head_color, 0.72))
    head = Polygon(head_pts, head_color)
    highlight = Polygon(
        ellipse_points((c[0] - 2.2, c[1] - 2.2), (2.6, 2.0), -0.6),
        (*mix(head_color, (255, 255, 255), 0.55), 170),
    )
    paint: list[Shape] = [
        Stroke(needle_pts + np.array((1.5, 2.0)), 2.2, (0, 0, 0, 60)),
        shadow(Polygon(ellipse_points(center, (HEAD_RADIUS + 0.5, HEAD_RADIUS + 0.5)), (0, 0, 0))),
        needle_shape,
        body,
        head,
        highlight,
    ]
    return Part(paint, [needle_shape, body, head])


def _nominal_pins(count: int) -> list[Shape]:
    yellow = PIN_COLORS["yellow"]
    return [s for k in range(count) for s in pin((60.0 + 40 * k, 100.0), 0.3, yellow).silhouette]


DEFECT_TYPES = (
    logical_absolute("1_additional_pushpin", lambda: _nominal_pins(1)),
    logical_absolute("2_additional_pushpins", lambda: _nominal_pins(2)),
    logical_absolute("missing_pushpin", lambda: _nominal_pins(1)),
    logical("missing_separator"),
    logical("mixed_pushpin_colors"),
    structural("front_bent"),
    structural("broken"),
    structural("color"),
    structural("contamination"),
)


ONE_PIN_DEFECTS = ("mixed_pushpin_colors", "front_bent", "broken", "color")


def _inside(cell: int, point: np.ndarray, margin: float) -> bool:
    x0, y0, x1, y1 = cell_rect(cell)
    return x0 + margin <= point[0] <= x1 - margin and y0 + margin <= point[1] <= y1 - margin


def _pin_pose(
    rng: np.random.Generator, cell: int, taken: list[tuple[float, float]] = ()
) -> tuple[tuple[float, float], float] | None:
    """A head position and needle angle with the whole pin inside ``cell``, clear of ``taken``."""
    x0, y0, x1, y1 = cell_rect(cell)
    margin = HEAD_RADIUS + SEPARATOR_WIDTH
    for _ in range(200):
        p = np.array([rng.uniform(x0 + margin, x1 - margin), rng.uniform(y0 + margin, y1 - margin)])
        angle = rng.uniform(0, 2 * np.pi)
        tip = p + (4.0 + NEEDLE_LENGTH) * np.array([np.cos(angle), np.sin(angle)])
        clear = all(np.hypot(*(p - q)) > 2 * HEAD_RADIUS + 2 for q in taken)
        if clear and _inside(cell, tip, SEPARATOR_WIDTH + 1):
            return (float(p[0]), float(p[1])), float(angle)
    return None


def build_scene(rng: np.random.Generator, defect: str | None) -> Scene:
    check_defect("pushpins", defect, DEFECT_TYPES)
    n_cells = ROWS * COLS
    poses = [_pin_pose(rng, k) for k in range(n_cells)]
    positions: list[list[tuple[float, float]]] = [[p] for p, _ in poses]
    angles: list[list[float]] = [[a] for _, a in poses]
    box_color = str(rng.choice(list(PIN_COLORS)))
    colors: list[list[Color]] = [
        [vary(rng, PIN_COLORS[box_color], PIN_SHADE)] for _ in range(n_cells)
    ]
    names: list[list[str]] = [[box_color] for _ in range(n_cells)]
    segments = separator_segments()
    removed_segment: int | None = None
    extra: list[tuple[int, int]] = []  # (cell, index within cell) of additional pins
    channels: list[Channel] = []
    target = int(rng.integers(n_cells))

    if defect in ("1_additional_pushpin", "2_additional_pushpins"):
        n_extra = 1 if defect == "1_additional_pushpin" else 2
        cells = rng.permutation(n_cells)
        for cell in cells:
            if len(extra) == n_extra:
                break
            pose = _pin_pose(rng, int(cell), positions[cell])
            if pose is not None:
                positions[cell].append(pose[0])
                angles[cell].append(pose[1])
                colors[cell].append(vary(rng, PIN_COLORS[box_color], PIN_SHADE))
                names[cell].append(box_color)
                extra.append((int(cell), len(positions[cell]) - 1))
    elif defect == "missing_pushpin":
        positions[target], angles[target], colors[target], names[target] = [], [], [], []
        x0, y0, x1, y1 = cell_rect(target)
        inset = SEPARATOR_WIDTH / 2
        region = rect_points(
            ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0 - 2 * inset, y1 - y0 - 2 * inset)
        )
        channels.append(Channel(defect, [Polygon(region, (255,))]))
    elif defect == "missing_separator":
        removed_segment = int(rng.integers(len(segments)))
        region = _segment_rect(segments[removed_segment], SEPARATOR_WIDTH + 3)
        channels.append(Channel(defect, [Polygon(region, (255,))]))
    elif defect == "mixed_pushpin_colors":  # a colour that is right in other boxes
        names[target][0] = str(rng.choice([c for c in PIN_COLORS if c != box_color]))
        colors[target][0] = vary(rng, PIN_COLORS[names[target][0]], PIN_SHADE)
    elif defect == "color":  # a colour that no box has
        names[target][0] = str(rng.choice(list(OFF_COLORS)))
        colors[target][0] = vary(rng, OFF_COLORS[names[target][0]], 0.05)

    x0, y0, x1, y1 = BOX
    box = Polygon(
        rounded_rect_points(((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0, y1 - y0), 6), BOX_RIM
    )
    floor = Polygon(
        rect_points(
            ((INNER[0] + INNER[2]) / 2, (INNER[1] + INNER[3]) / 2),
            (INNER[2] - INNER[0], INNER[3] - INNER[1]),
        ),
        FLOOR,
    )
    shapes: list[Shape] = [shadow(box, (3.0, 4.0), 90), box, floor]
    for k, segment in enumerate(segments):
        if k != removed_segment:
            wall = Polygon(_segment_rect(segment, SEPARATOR_WIDTH), SEPARATOR)
            shapes += [shadow(wall, (1.2, 1.2), 60), wall]

    extra_shapes: list[Shape] = []
    for cell in range(n_cells):
        for j, (p, a, col) in enumerate(zip(positions[cell], angles[cell], colors[cell])):
            needle = "straight"
            if cell == target and j == 0 and defect == "front_bent":
                needle = "bent"
            elif cell == target and j == 0 and defect == "broken":
                needle = "broken"
            part = pin(p, a, col, needle, rng)
            shapes += part.paint
            if (cell, j) in extra:
                extra_shapes += part.silhouette
            if cell == target and j == 0 and defect in ONE_PIN_DEFECTS:
                region = part.silhouette
                if needle == "broken":  # the snapped-off needle belongs to the defect region
                    region = region + pin(p, a, col).silhouette
                channels.append(Channel(defect, region))
    if extra_shapes:
        channels.append(Channel(defect, extra_shapes))
    if defect == "contamination":
        for _ in range(1 if rng.random() < 0.7 else 2):
            cell = int(rng.integers(n_cells))
            center, _ = _pin_pose(rng, cell, positions[cell])
            dirt = contamination(rng, center, rng.uniform(4.0, 6.5))
            shapes += dirt
            channels.append(Channel(defect, dirt))

    facts = {
        "pins_per_compartment": [len(p) for p in positions],
        "separators": len(segments) - (removed_segment is not None),
        "expected_separators": len(segments),
        "box_color": box_color,
        "pin_colors": [c for cell in names for c in cell],
        "pin_centers": [p for cell in positions for p in cell],
    }
    return Scene(shapes, channels, facts)


CATEGORY = CategoryDef(
    name="pushpins",
    design_size=SIZE,
    defect_types=DEFECT_TYPES,
    build_scene=build_scene,
    backdrop_color=(54, 52, 50),
    backdrop_texture=0.10,
    jitter_angle=np.deg2rad(2.0),
    jitter_shift=4.0,
    description="a box of 5 x 3 compartments with exactly one pushpin in each, all of one colour",
)
