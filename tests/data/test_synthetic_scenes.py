"""engine.data.synthetic scenes: each category's logical rules, item variants between good
images, and masks that cover exactly the defective part."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data.synthetic import (
    CATEGORIES,
    breakfast_box,
    get_category,
    pushpins,
    screw_bag,
    splicing_connectors,
)
from engine.data.synthetic import writer as writer_module
from engine.data.synthetic.raster import fit_placement, rasterize, render
from engine.data.types import GOOD


def _scenes(category: str, defect: str | None, n: int = 6) -> list[dict]:
    build = get_category(category).build_scene
    return [build(np.random.default_rng([11, k]), defect).facts for k in range(n)]


def _odd_ones(values: list[str], majority: str) -> list[int]:
    return [k for k, v in enumerate(values) if v != majority]


def test_pushpins_rules() -> None:
    for facts in _scenes("pushpins", None):
        assert facts["pins_per_compartment"] == [1] * 15
        assert facts["separators"] == facts["expected_separators"]
        assert facts["box_color"] in pushpins.PIN_COLORS
        assert set(facts["pin_colors"]) == {facts["box_color"]}
    for facts in _scenes("pushpins", "2_additional_pushpins"):  # extra pins are of the box colour
        assert set(facts["pin_colors"]) == {facts["box_color"]}
    for defect, valid in (("mixed_pushpin_colors", True), ("color", False)):
        for facts in _scenes("pushpins", defect):
            (odd,) = _odd_ones(facts["pin_colors"], facts["box_color"])
            # relational: the odd colour is one that other, good boxes have; structural: none has
            assert (facts["pin_colors"][odd] in pushpins.PIN_COLORS) is valid
            assert facts["pins_per_compartment"] == [1] * 15
    for defect, total in (
        ("1_additional_pushpin", 16),
        ("2_additional_pushpins", 17),
        ("missing_pushpin", 14),
    ):
        for facts in _scenes("pushpins", defect):
            assert sum(facts["pins_per_compartment"]) == total
    for facts in _scenes("pushpins", "missing_separator"):
        assert facts["separators"] == facts["expected_separators"] - 1


def test_screw_bag_rules() -> None:
    good = {"long_screw": 1, "short_screw": 1, "nut": 2, "washer": 2}
    for facts in _scenes("screw_bag", None):
        assert facts["counts"] == good
    changes = {
        "1_additional_nut": ("nut", 3),
        "1_additional_washer": ("washer", 3),
        "1_missing_long_screw": ("long_screw", 0),
        "1_missing_washer": ("washer", 1),
    }
    for defect, (kind, count) in changes.items():
        for facts in _scenes("screw_bag", defect):
            assert facts["counts"] == {**good, kind: count}
    for facts in _scenes("screw_bag", None) + _scenes("screw_bag", "1_additional_nut"):
        assert facts["finish"] in screw_bag.FINISHES
        assert set(facts["part_finishes"]) == {facts["finish"]}
    for defect, valid in (("mixed_finishes", True), ("color", False)):
        for facts in _scenes("screw_bag", defect):
            (odd,) = _odd_ones(facts["part_finishes"], facts["finish"])
            assert (facts["part_finishes"][odd] in screw_bag.FINISHES) is valid
            assert facts["counts"] == good
    good_lengths = _scenes("screw_bag", None)[0]["screw_lengths"]
    assert max(_scenes("screw_bag", "screw_too_long")[0]["screw_lengths"]) > max(good_lengths) + 10
    assert min(_scenes("screw_bag", "screw_too_short")[0]["screw_lengths"]) < min(good_lengths) - 10


def test_splicing_connectors_rules() -> None:
    for facts in _scenes("splicing_connectors", None):
        left, right = facts["connectors"]
        assert left == right and len(facts["cables"]) == 1
        left, right = facts["lever_colors"]
        assert left == right and left in splicing_connectors.LEVERS
    for defect, valid in (("mixed_connector_colors", True), ("color", False)):
        for facts in _scenes("splicing_connectors", defect):
            left, right = facts["lever_colors"]
            assert left != right
            assert (left in splicing_connectors.LEVERS) + (right in splicing_connectors.LEVERS) == (
                2 if valid else 1
            )
            assert facts["connectors"][0] == facts["connectors"][1]
    for facts in _scenes("splicing_connectors", "wrong_connector_type_5_2"):
        assert sorted(facts["connectors"]) == [2, 5]
    for facts in _scenes("splicing_connectors", "extra_cable"):
        assert len(facts["cables"]) == 2
    for facts in _scenes("splicing_connectors", "missing_connector"):
        assert None in facts["connectors"]
    good_span = _scenes("splicing_connectors", None)[0]["span"]
    assert _scenes("splicing_connectors", "cable_too_short_T3")[0]["span"] < good_span - 10


def test_juice_bottle_rules() -> None:
    for facts in _scenes("juice_bottle", None):
        assert facts["juice"] == facts["icon"]
        assert facts["labels_top_to_bottom"] == ["fruit", "text"]
    for facts in _scenes("juice_bottle", "wrong_juice_type"):
        assert facts["juice"] not in (None, facts["icon"])
    for facts in _scenes("juice_bottle", "swapped_labels"):
        assert facts["labels_top_to_bottom"] == ["text", "fruit"]
    for facts in _scenes("juice_bottle", "missing_top_label"):
        assert facts["labels_top_to_bottom"] == ["text"]
    assert all(f["juice"] is None for f in _scenes("juice_bottle", "empty_bottle"))


def test_breakfast_box_rules() -> None:
    for facts in _scenes("breakfast_box", None):
        assert facts["fruit_counts"] == {"tangerine": 2, "nectarine": 1}
        assert facts["fruit_side"] == "left" and facts["cereal"]
        assert facts["banana_chips"] > 0 and facts["almonds"] > 0
        assert facts["granola_bake"] in breakfast_box.BAKES
    fruit = {
        "2_nectarines_1_tangerine": {"tangerine": 1, "nectarine": 2},
        "1_nectarine_1_tangerine": {"tangerine": 1, "nectarine": 1},
        "0_nectarines_2_tangerines": {"tangerine": 2, "nectarine": 0},
        "0_nectarines_3_tangerines": {"tangerine": 3, "nectarine": 0},
    }
    for defect, counts in fruit.items():
        for facts in _scenes("breakfast_box", defect):
            assert facts["fruit_counts"] == counts
    assert all(
        f["almonds"] == 0 < f["banana_chips"] for f in _scenes("breakfast_box", "missing_almonds")
    )
    assert all(
        f["banana_chips"] == 0 < f["almonds"] for f in _scenes("breakfast_box", "missing_bananas")
    )
    assert not any(f["cereal"] for f in _scenes("breakfast_box", "missing_cereals"))
    assert all(f["fruit_side"] == "right" for f in _scenes("breakfast_box", "compartments_swapped"))
    good_level = _scenes("breakfast_box", None)[0]["granola_top_fraction"]
    assert _scenes("breakfast_box", "underflow")[0]["granola_top_fraction"] > good_level


# the fact that names a category's per-image item variant, and its value in a scene's facts
VARIANT_FACTS = {
    "pushpins": lambda f: f["box_color"],
    "screw_bag": lambda f: f["finish"],
    "splicing_connectors": lambda f: f["lever_colors"][0],
    "breakfast_box": lambda f: f["granola_bake"],
    "juice_bottle": lambda f: f["icon"],
}


@pytest.mark.parametrize("category", CATEGORIES)
def test_good_images_show_item_variants(category: str) -> None:
    """The first 30 train images, drawn exactly as ``generate_category`` draws them, hold at least
    two item variants (colour or finish), so no detector can learn one colour as 'good'."""
    spec = get_category(category)
    train_code = writer_module.FOLDERS.index(("train", GOOD))
    half = (spec.design_size[0] // 2, spec.design_size[1] // 2)
    variants = {
        VARIANT_FACTS[category](
            writer_module.render_image(
                spec, writer_module.image_rng(0, category, train_code, i), half, None
            ).facts
        )
        for i in range(30)
    }
    assert len(variants) >= 2, variants


def _identity(category: str) -> tuple:
    """``rasterize``'s placement and size arguments for design size without jitter."""
    size = get_category(category).design_size
    return fit_placement(size, size), size


def _flat_render(category: str, defect: str, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One scene at design size without pose jitter or camera effects: facts, float image, mask."""
    scene = get_category(category).build_scene(np.random.default_rng([23, seed]), defect)
    placement, size = _identity(category)
    image = render(scene.shapes, placement, np.full((size[1], size[0], 3), 128.0))
    (channel,) = scene.channels
    mask = rasterize(channel.shapes, placement, size) & ~rasterize(channel.exclude, placement, size)
    return scene.facts, image, mask


def _closer_to(pixels: np.ndarray, color: tuple, other: tuple) -> bool:
    median = np.median(pixels, axis=0)
    return np.linalg.norm(median - color[:3]) < np.linalg.norm(median - other[:3])


@pytest.mark.parametrize("seed", range(4))
def test_pushpins_odd_colour_mask(seed: int) -> None:
    facts, image, mask = _flat_render("pushpins", "mixed_pushpin_colors", seed)
    (odd,) = _odd_ones(facts["pin_colors"], facts["box_color"])
    inside = [mask[round(y), round(x)] for x, y in facts["pin_centers"]]
    assert inside == [k == odd for k in range(len(inside))]  # that pin and no other
    one_pin = rasterize(
        pushpins.pin((100.0, 100.0), 0.3, (0, 0, 0)).silhouette, *_identity("pushpins")
    )
    assert 0.8 * one_pin.sum() < mask.sum() < 1.25 * one_pin.sum()
    colors = pushpins.PIN_COLORS
    odd_color, box_color = colors[facts["pin_colors"][odd]], colors[facts["box_color"]]
    assert _closer_to(image[mask], odd_color, box_color)


@pytest.mark.parametrize("seed", range(4))
def test_screw_bag_mixed_finish_mask(seed: int) -> None:
    facts, image, mask = _flat_render("screw_bag", "mixed_finishes", seed)
    (odd,) = _odd_ones(facts["part_finishes"], facts["finish"])
    inside = [mask[round(y), round(x)] for x, y in facts["part_centers"]]
    assert inside == [k == odd for k in range(len(inside))]
    nominal = rasterize(screw_bag._nominal(facts["part_kinds"][odd]), *_identity("screw_bag"))
    assert 0.8 * nominal.sum() < mask.sum() < 1.25 * nominal.sum()
    finishes = screw_bag.FINISHES
    odd_color = finishes[facts["part_finishes"][odd]]
    assert _closer_to(image[mask], odd_color, finishes[facts["finish"]])


@pytest.mark.parametrize("seed", range(4))
def test_splicing_connectors_mixed_colour_mask(seed: int) -> None:
    """Neither connector alone is wrong, so the mask holds the levers of both, each side in its
    own colour."""
    facts, image, mask = _flat_render("splicing_connectors", "mixed_connector_colors", seed)
    levers = splicing_connectors.LEVERS
    left, right = (levers[name] for name in facts["lever_colors"])
    middle = get_category("splicing_connectors").design_size[0] // 2
    halves = np.zeros_like(mask)
    halves[:, :middle] = True
    assert _closer_to(image[mask & halves], left, right)
    assert _closer_to(image[mask & ~halves], right, left)
    config = {d.name: d for d in get_category("splicing_connectors").defect_types}
    assert config["mixed_connector_colors"].relative_saturation == 0.5
