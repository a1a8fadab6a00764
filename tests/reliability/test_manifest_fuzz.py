"""Seeded fuzz of the manifest's fields (deleted, retyped, nested, huge, NaN, strings), resealed
as a build would: loading either refuses with an ArtifactError or gives a working detector."""

from __future__ import annotations

import copy
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.artifact import ArtifactError, load_artifact

DELETE = object()
DEEP = "__deep__"  # replaced in the JSON text by a list nested 100 000 deep
MUTATIONS = [
    lambda old: DELETE,
    lambda old: None,
    lambda old: True,
    lambda old: 0,
    lambda old: -1,
    lambda old: 10**30,
    lambda old: 1e308,
    lambda old: math.nan,
    lambda old: -math.inf,
    lambda old: "",
    lambda old: str(old),
    lambda old: [old],
    lambda old: {"value": old},
    lambda old: [],
    lambda old: {},
    lambda old: DEEP,
    lambda old: old * 2 if isinstance(old, int | float | str | list) else old,
]


def _leaf_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Key paths of every field (objects and lists included) below the root."""
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else []
    )
    paths = []
    for key, child in children:
        paths.append((*prefix, key))
        paths.extend(_leaf_paths(child, (*prefix, key)))
    return paths


def _mutated(manifest: dict, path: tuple, mutation) -> dict:
    out = copy.deepcopy(manifest)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    new = mutation(parent[path[-1]])
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return out


def _write(path: Path, manifest: dict, tiny) -> None:
    text = json.dumps({**manifest, tiny["SEAL"]: "0" * 64}, indent=2, sort_keys=True) + "\n"
    text = text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
    (path / "manifest.json").write_bytes(tiny["reseal"](text.encode()))


@pytest.mark.parametrize(
    "cases", [pytest.param(40, id="40"), pytest.param(400, id="400", marks=pytest.mark.slow)]
)
def test_manifest_fuzz_only_raises_artifact_errors(
    tmp_path: Path, sources: dict, faults, tiny, cases: int
) -> None:
    path = tmp_path / "art"
    faults.write_copy(path, sources["A"])
    original = json.loads((path / "manifest.json").read_text())
    paths = [p for p in _leaf_paths(original) if p != (tiny["SEAL"],)]
    rng, outcomes = random.Random(f"manifest-fuzz-{cases}"), Counter()
    frame = torch.zeros(1, 24, 40, 3, dtype=torch.uint8)
    for _ in range(cases):
        field, mutation = rng.choice(paths), rng.choice(MUTATIONS)
        _write(path, _mutated(original, field, mutation), tiny)
        try:
            detector, _ = load_artifact(path)
        except ArtifactError:
            outcomes["refused"] += 1
            continue
        # Harmless (a field the loader does not use, or a value it accepts): it must work.
        maps = detector(frame)
        assert maps.fused is not None and torch.isfinite(maps.fused).all(), field
        outcomes["loaded"] += 1
    assert outcomes["refused"] >= cases // 2, outcomes
