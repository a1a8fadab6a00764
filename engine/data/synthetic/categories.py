"""The five synthetic categories, by their MVTec LOCO AD names."""

from __future__ import annotations

from engine.data.synthetic import (
    breakfast_box,
    juice_bottle,
    pushpins,
    screw_bag,
    splicing_connectors,
)
from engine.data.synthetic.scene import CategoryDef

_REGISTRY: dict[str, CategoryDef] = {
    module.CATEGORY.name: module.CATEGORY
    for module in (breakfast_box, juice_bottle, pushpins, screw_bag, splicing_connectors)
}
CATEGORIES: tuple[str, ...] = tuple(_REGISTRY)


def get_category(name: str) -> CategoryDef:
    """The definition of category ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown category {name!r}; valid: {', '.join(CATEGORIES)}")
    return _REGISTRY[name]
