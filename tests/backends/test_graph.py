"""The ``graph`` backend: the whole frame replayed as one CUDA graph per frame shape gives the
eager Runtime's maps; off CUDA it refuses clearly."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import backends
from engine.backends import apply_backend
from engine.frame_graph import FrameGraphs
from engine.models.knn_index import faiss_available, make_index
from engine.runtime import Runtime

TINY = runpy.run_path(str(Path(__file__).parents[1] / "reliability" / "tiny.py"))
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
MAPS = ("anomaly_map", "logical_map", "structural_map", "positional_map", "composition_map")


def test_graph_backend_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        backends.resolve_backend("graph", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        FrameGraphs(lambda frames: [frames], torch.device("cpu"))


@pytest.mark.parametrize("max_buckets", [0, 1.5, True])
def test_frame_graphs_refuse_a_bad_bucket_count(max_buckets: object) -> None:
    with pytest.raises(ValueError, match="max_buckets"):
        FrameGraphs(lambda frames: [frames], torch.device("cuda"), max_buckets)  # type: ignore[arg-type]


def cuda_detector(own_size: int | None):
    detector, config = TINY["tiny_detector"](0)
    if own_size is not None:  # with every optional branch
        detector = TINY["with_composition"](detector, config, own_size)
        detector, _ = TINY["with_positional"](detector, config)
    return detector.to("cuda")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("own_size", [None, 24])
def test_graph_equals_eager_and_captures_each_shape_once(own_size: int | None) -> None:
    detector = cuda_detector(own_size)
    frames = torch.randint(0, 256, (2, 40, 50, 3), dtype=torch.uint8)
    other = torch.randint(0, 256, (1, 30, 60, 3), dtype=torch.uint8)
    eager_rt = Runtime(detector, {}, "eager", threshold=1.0)
    eager = [eager_rt(frames, color="rgb"), eager_rt(other, color="rgb")]
    assert apply_backend(detector, "graph") == "graph"
    rt = Runtime(detector, {}, "graph", threshold=1.0)
    for _ in range(2):  # captured on the first call, replayed on the second
        for batch, expected in zip((frames, other), eager, strict=True):
            for got, want in zip(rt(batch, color="rgb"), expected, strict=True):
                for name in MAPS:
                    if getattr(want, name) is None:
                        assert getattr(got, name) is None
                        continue
                    np.testing.assert_allclose(
                        getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4
                    )
    assert rt._graphs is not None and rt._graphs.shapes == [(2, 40, 50, 3), (1, 30, 60, 3)]


@pytest.mark.gpu
@cuda_only
def test_frame_graphs_drop_the_least_recently_used_shape() -> None:
    graphs = FrameGraphs(lambda frames: [frames.float().mean((1, 2))], torch.device("cuda"), 2)
    shapes = [(1, 4, 4, 3), (1, 5, 5, 3), (1, 4, 4, 3), (1, 6, 6, 3)]
    for shape in shapes:
        frames = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
        (mean,) = graphs(frames)
        torch.testing.assert_close(mean, frames.float().mean((1, 2)))
    assert graphs.shapes == [(1, 4, 4, 3), (1, 6, 6, 3)]


@pytest.mark.gpu
@cuda_only
@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_graph_refuses_a_faiss_index() -> None:
    detector = cuda_detector(None)
    searcher = make_index("faiss_flat")
    searcher.add(detector.structural.bank)
    detector.structural.use_index(searcher)
    with pytest.raises(RuntimeError, match="FAISS index"):
        apply_backend(detector, "graph")
