"""The ``onnx`` backend: the eager maps, a graph cache keyed by the weights, clear refusals."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from engine import backends
from engine.backends import apply_backend, onnx

TINY = runpy.run_path(str(Path(__file__).parents[1] / "reliability" / "tiny.py"))
pytestmark = pytest.mark.skipif(not onnx.onnx_available(), reason="onnxruntime not installed")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "npgmf-engine" / "onnx"


def frames() -> torch.Tensor:
    return torch.randint(0, 256, (3, 40, 50, 3), dtype=torch.uint8)


@pytest.mark.slow
def test_onnx_equals_eager_and_caches_its_graphs(cache: Path, monkeypatch) -> None:
    detector, _ = TINY["tiny_detector"](0)
    batch = frames()
    eager = detector(batch)
    assert apply_backend(detector, "onnx") == "onnx"
    assert isinstance(detector.logical_fn, onnx.OrtFunction)
    assert isinstance(detector.structural_side.features_fn, onnx.OrtPatchFeatures)
    assert detector._logical_worker is not None  # the logical graph overlaps the structural stream
    got = detector(batch)
    for name in ("fused", "logical", "structural"):
        torch.testing.assert_close(getattr(got, name), getattr(eager, name), rtol=1e-4, atol=1e-4)
    graphs = sorted(p.name for p in cache.glob("*/*.onnx"))
    assert graphs == ["features.onnx", "logical.onnx"]

    # Same weights: the cached graphs are used, nothing is exported again.
    def no_export(*args: object) -> None:
        raise AssertionError("exported although the graphs are cached")

    monkeypatch.setattr(onnx, "_export", no_export)
    again, _ = TINY["tiny_detector"](0)
    apply_backend(again, "onnx")
    torch.testing.assert_close(again(batch).fused, got.fused)
    # Back to eager: the module's own features again.
    apply_backend(again, "eager")
    assert again.structural_side.features_fn is None and again._logical_worker is None


@pytest.mark.slow
def test_onnx_exports_a_second_feature_graph_for_the_composition_size(cache: Path) -> None:
    """With a positional memory too: it scores the bank's features, as the structural map does."""
    tiny, config = TINY["tiny_detector"](0)
    detector, _ = TINY["with_positional"](TINY["with_composition"](tiny, config, 24), config)
    batch = frames()
    eager = detector(batch)
    key = onnx.graph_key(detector)
    assert key != onnx.graph_key(tiny)
    apply_backend(detector, "onnx")
    got = detector(batch)
    for name in ("fused", "logical", "structural", "positional", "composition"):
        torch.testing.assert_close(getattr(got, name), getattr(eager, name), rtol=1e-4, atol=1e-4)
    graphs = sorted(p.name for p in (cache / key).glob("*.onnx"))
    assert graphs == ["features.onnx", "features_24.onnx", "logical.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("own_size", [None, 24])
def test_onnx_exports_the_fine_levels_for_the_composition_fine_parts(
    cache: Path, own_size: int | None
) -> None:
    """``composition.fine_parts``: the graph of the pass the composition branch reads also
    returns the two raw levels; the maps equal eager's."""
    tiny, config = TINY["tiny_detector"](0, levels=("layer1", "layer2"))
    detector = TINY["with_composition"](tiny, config, own_size or TINY["SIZE"], fine_parts=True)
    batch = frames()
    eager = detector(batch)
    key = onnx.graph_key(detector)
    apply_backend(detector, "onnx")
    got = detector(batch)
    for name in ("fused", "logical", "structural", "composition"):
        torch.testing.assert_close(getattr(got, name), getattr(eager, name), rtol=1e-4, atol=1e-4)
    graphs = sorted(p.name for p in (cache / key).glob("*.onnx"))
    assert graphs == (
        ["features.onnx", "features_24.onnx", "logical.onnx"]
        if own_size
        else ["features.onnx", "logical.onnx"]
    )
    fine_graph = detector.structural_side.features_fn.graphs[own_size or TINY["SIZE"]]
    assert fine_graph[2] and len(fine_graph[0].session.get_outputs()) == 3


def test_feature_graphs_refuse_a_size_they_were_not_exported_for() -> None:
    with pytest.raises(ValueError, match=r"no exported patch-feature graph for 24-px inputs"):
        onnx.OrtPatchFeatures({})(torch.zeros(1, 3, 24, 24))


def test_graph_key_follows_the_weights() -> None:
    first, _ = TINY["tiny_detector"](0)
    same, _ = TINY["tiny_detector"](0)
    other, _ = TINY["tiny_detector"](1)
    assert onnx.graph_key(first) == onnx.graph_key(same) != onnx.graph_key(other)
    with torch.no_grad():
        next(same.structural.patch_features.parameters()).add_(1e-3)
    assert onnx.graph_key(same) != onnx.graph_key(first)


def test_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path: Path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    folder = onnx._graph_folder("key")
    try:
        assert folder.is_dir() and blocker not in folder.parents
        assert "cannot write the ONNX cache" in caplog.text
    finally:
        shutil.rmtree(folder)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not onnx.onnx_cuda_available(),
    reason="needs a CUDA device and onnxruntime-gpu",
)
def test_onnx_on_cuda_equals_eager(cache: Path) -> None:
    detector, _ = TINY["tiny_detector"](0)
    detector = detector.to("cuda")
    batch = frames()
    eager = detector(batch)
    assert apply_backend(detector, "onnx") == "onnx"
    got = detector(batch)
    for name in ("fused", "logical", "structural"):
        torch.testing.assert_close(getattr(got, name), getattr(eager, name), rtol=1e-3, atol=1e-3)


class FakeSession:
    """Records how an ``onnxruntime.InferenceSession`` was opened; one output, as declared."""

    opened: ClassVar[list] = []

    def __init__(self, path: str, options: object, providers: list) -> None:
        FakeSession.opened.append(providers)
        self.shape = ["batch", 4, 5]

    def get_inputs(self) -> list:
        return [SimpleNamespace(name="x")]

    def get_outputs(self) -> list:
        return [SimpleNamespace(name="y", shape=self.shape, type="tensor(float)")]


def test_a_cuda_session_puts_the_cuda_provider_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    FakeSession.opened.clear()
    function = onnx.OrtFunction(Path("g.onnx"), 1, torch.device("cuda", 1))
    cpu = onnx.OrtFunction(Path("g.onnx"), 1)
    assert FakeSession.opened == [
        [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"],
        ["CPUExecutionProvider"],
    ]
    assert (function.device_id, cpu.device.type) == (1, "cpu")
    assert function.output_shapes == [("y", (4, 5))]


def test_outputs_need_fixed_dimensions_after_the_batch() -> None:
    symbolic = SimpleNamespace(name="y", shape=["batch", "h", 5], type="tensor(float)")
    with pytest.raises(RuntimeError, match="'y' is tensor\\(float\\) of shape"):
        onnx._static_tail(symbolic, Path("g.onnx"))
    half = SimpleNamespace(name="y", shape=["batch", 4, 5], type="tensor(float16)")
    with pytest.raises(RuntimeError, match="binds float32 outputs"):
        onnx._static_tail(half, Path("g.onnx"))


def test_cpu_outputs_are_written_in_place_for_any_batch(cache: Path) -> None:
    """The bound outputs follow the input's batch size; the values are the module's."""
    detector, _ = TINY["tiny_detector"](0)
    apply_backend(detector, "onnx")
    x = torch.rand(3, 3, detector.map_size, detector.map_size)
    with torch.no_grad():
        expected = detector.logical.anomaly_map(x)
    for batch in (1, 3):
        got = detector.logical_fn(x[:batch])
        assert got.shape == expected[:batch].shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected[:batch], rtol=1e-4, atol=1e-4)


def test_refusals_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx, "onnx_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        backends.resolve_backend("onnx", torch.device("cuda"))
    monkeypatch.setattr(
        onnx, "onnx_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert backends.resolve_backend("onnx", torch.device("cuda")) == "onnx"
    with pytest.raises(RuntimeError, match="CPU or CUDA"):
        backends.resolve_backend("onnx", torch.device("meta"))
    monkeypatch.setattr(backends, "onnx_available", lambda: False)
    with pytest.raises(RuntimeError, match="onnxruntime and onnxscript"):
        backends.resolve_backend("onnx", torch.device("cpu"))


def test_auto_picks_onnx_on_cpu_for_float32_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert backends.resolve_backend("auto", cpu) == "onnx"
    assert backends.resolve_backend("auto", cpu, "fp16") == "eager"
    assert backends.resolve_backend("auto", torch.device("cuda")) == "compile"
    monkeypatch.setattr(backends, "onnx_available", lambda: False)
    assert backends.resolve_backend("auto", cpu) == "eager"


def test_auto_falls_back_to_eager_when_the_export_fails(monkeypatch, caplog) -> None:
    def broken_export(detector: object) -> None:
        detector.logical_fn = None  # a half-installed backend must not survive the fallback
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(backends, "apply_onnx", broken_export)
    detector, _ = TINY["tiny_detector"](0)
    batch = frames()
    expected = detector(batch).fused

    assert apply_backend(detector, "auto") == "eager"
    assert "exporter crashed" in caplog.text and "falls back to 'eager'" in caplog.text
    torch.testing.assert_close(detector(batch).fused, expected)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        apply_backend(detector, "onnx")  # asked for by name: the failure is the answer
