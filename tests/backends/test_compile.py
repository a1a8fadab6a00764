"""The ``compile`` backend gives the eager maps, with every kNN search kind it can use."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from engine.backends import apply_backend
from engine.models.knn_index import faiss_available, make_index

TINY = runpy.run_path(str(Path(__file__).parents[1] / "reliability" / "tiny.py"))


# The cpu preset's layout: the stride-4 level max-pooled onto the layer2 grid.
GRID = {"levels": ("layer1", "layer2"), "grid_level": "layer2"}

# (device, index, the composition branch's own input size: None = no composition branch,
# the memory bank's levels)
CASES = [
    pytest.param("cpu", "torch", None, {}, marks=pytest.mark.slow),
    pytest.param("cpu", "faiss_flat", None, {}, marks=pytest.mark.slow),
    pytest.param("cpu", "torch", 24, {}, marks=pytest.mark.slow),
    pytest.param("cpu", "torch", None, GRID, marks=pytest.mark.slow, id="cpu-torch-grid"),
    pytest.param("cuda", "torch", None, {}, marks=pytest.mark.gpu),
    pytest.param("cuda", "torch", 24, {}, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize(("device", "index", "own_size", "levels"), CASES)
def test_compile_equals_eager(device: str, index: str, own_size: int | None, levels: dict) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if index == "faiss_flat" and not faiss_available():
        pytest.skip("faiss is not installed")
    detector, config = TINY["tiny_detector"](0, **levels)
    if own_size is not None:  # with every optional branch
        detector = TINY["with_composition"](detector, config, own_size)
        detector, _ = TINY["with_positional"](detector, config)
    detector.to(device)
    if index != "torch":
        searcher = make_index(index)
        searcher.add(detector.structural.bank)
        detector.structural.use_index(searcher)
    frames = torch.randint(0, 256, (2, 40, 50, 3), dtype=torch.uint8, device=device)
    eager = detector(frames)
    assert apply_backend(detector, "compile") == "compile"
    for _ in range(2):  # the second call runs the compiled code without recompiling
        compiled = detector(frames)
        for name in ("fused", "logical", "structural", "positional", "composition"):
            if getattr(eager, name) is None:
                continue
            torch.testing.assert_close(
                getattr(compiled, name), getattr(eager, name), rtol=1e-4, atol=1e-4
            )
