"""The ``tensorrt`` backend: how it configures ONNX Runtime's TensorRT provider, and its
refusals. No machine this runs on has TensorRT: the sessions are faked where they would build
engines, and the engines' maps are not compared with eager anywhere yet."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import ClassVar

import pytest
import torch

from engine import backends
from engine.backends import apply_backend, onnx, tensorrt

TINY = runpy.run_path(str(Path(__file__).parents[1] / "reliability" / "tiny.py"))
pytestmark = pytest.mark.skipif(not onnx.onnx_available(), reason="onnxruntime not installed")
CUDA = torch.device("cuda")


def test_provider_options_set_the_precision_the_cache_and_one_profile(tmp_path: Path) -> None:
    options = tensorrt.provider_options(1, "fp16", tmp_path, "x", 384)
    assert options["device_id"] == 1 and options["trt_fp16_enable"] is True
    assert "trt_bf16_enable" not in options
    assert options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)
    assert options["trt_profile_min_shapes"] == "x:1x3x384x384"
    assert options["trt_profile_opt_shapes"] == "x:1x3x384x384"
    assert options["trt_profile_max_shapes"] == f"x:{tensorrt.TRT_MAX_BATCH}x3x384x384"
    fp32 = tensorrt.provider_options(0, "fp32", tmp_path, "x", 256)
    assert fp32["trt_fp16_enable"] is False and "trt_bf16_enable" not in fp32
    bf16 = tensorrt.provider_options(0, "bf16", tmp_path, "x", 256)
    assert bf16["trt_bf16_enable"] is True and bf16["trt_fp16_enable"] is False
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        tensorrt.provider_options(0, "int8", tmp_path, "x", 256)


def test_engines_are_cached_per_gpu_model_tensorrt_version_and_precision() -> None:
    graphs = Path("/cache/abc")
    h100 = tensorrt.engine_folder(graphs, "NVIDIA H100 80GB HBM3", "10.9.0", "fp16")
    assert h100 == graphs / "tensorrt" / "NVIDIA-H100-80GB-HBM3-trt10.9.0-fp16"
    others = {
        tensorrt.engine_folder(graphs, "NVIDIA H200", "10.9.0", "fp16"),
        tensorrt.engine_folder(graphs, "NVIDIA H100 80GB HBM3", "10.10.0", "fp16"),
        tensorrt.engine_folder(graphs, "NVIDIA H100 80GB HBM3", "10.9.0", "fp32"),
    }
    assert len(others) == 3 and h100 not in others


def test_refusals_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        backends.resolve_backend("tensorrt", torch.device("cpu"))
    find_spec = tensorrt.importlib.util.find_spec
    without = {"tensorrt": None}
    monkeypatch.setattr(
        tensorrt.importlib.util, "find_spec", lambda name: without.get(name, find_spec(name))
    )
    with pytest.raises(RuntimeError, match="the tensorrt package"):
        backends.resolve_backend("tensorrt", CUDA)
    without["tensorrt"] = object()
    monkeypatch.setattr(tensorrt, "onnx_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="TensorrtExecutionProvider"):
        backends.resolve_backend("tensorrt", CUDA, "fp16")
    monkeypatch.setattr(tensorrt, "onnx_available", lambda: False)
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        backends.resolve_backend("tensorrt", CUDA)
    monkeypatch.setattr(backends, "tensorrt_missing", lambda: None)
    assert backends.resolve_backend("tensorrt", CUDA, "bf16") == "tensorrt"


class FakeTrtSession:
    """Stands in for ``onnxruntime.InferenceSession`` with the TensorRT provider: records the
    providers each session was opened with and reports ``used`` as the ones it runs on."""

    opened: ClassVar[list] = []
    used: ClassVar[list] = []

    def __init__(self, path: str, options: object, providers: list) -> None:
        FakeTrtSession.opened.append((Path(path).name, providers))

    def get_inputs(self) -> list:
        return [SimpleNamespace(name="x")]

    def get_outputs(self) -> list:
        return [SimpleNamespace(name="y", shape=["batch", 4, 5], type="tensor(float)")]

    def get_providers(self) -> list:
        return list(FakeTrtSession.used)


@pytest.fixture
def fake_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The backend's environment faked: a tensorrt module, a GPU name, recorded sessions; the
    ONNX cache in ``tmp_path``. Returns the cache root."""
    import onnxruntime

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module = ModuleType("tensorrt")
    module.__version__ = "10.9.0"
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(backends, "resolve_backend", lambda name, device, precision: name)
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeTrtSession)
    FakeTrtSession.opened.clear()
    return tmp_path / "cache" / "npgmf-engine" / "onnx"


@pytest.mark.slow
def test_every_graph_gets_the_tensorrt_provider_first(fake_tensorrt: Path) -> None:
    FakeTrtSession.used = [tensorrt.PROVIDER, "CUDAExecutionProvider", "CPUExecutionProvider"]
    detector, _ = TINY["tiny_detector"](0)
    detector.set_precision("fp16")
    assert apply_backend(detector, "tensorrt") == "tensorrt"
    sides = {"logical.onnx": detector.map_size, "features.onnx": detector.structural_transform.size}
    assert sorted(name for name, _ in FakeTrtSession.opened) == sorted(sides)
    for name, providers in FakeTrtSession.opened:
        (first, options), cuda, cpu = providers
        assert (first, cuda, cpu) == (
            tensorrt.PROVIDER,
            ("CUDAExecutionProvider", {"device_id": 0}),
            "CPUExecutionProvider",
        )
        side = sides[name]
        assert options["trt_profile_opt_shapes"] == f"x:1x3x{side}x{side}"
        assert options["trt_fp16_enable"] is True
        cache = Path(options["trt_engine_cache_path"])
        assert cache.is_dir() and cache.name == "NVIDIA-H100-trt10.9.0-fp16"
        assert cache.parent.parent.parent == fake_tensorrt  # beside the graphs, keyed by weights


@pytest.mark.slow
def test_a_graph_onnx_runtime_did_not_give_to_tensorrt_is_refused(fake_tensorrt: Path) -> None:
    FakeTrtSession.used = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    detector, _ = TINY["tiny_detector"](0)
    with pytest.raises(RuntimeError, match=r"did not run logical\.onnx on TensorRT"):
        apply_backend(detector, "tensorrt")
    assert detector.logical_fn == detector.logical.anomaly_map  # eager again, nothing half-set
    assert detector.structural_side.features_fn is None and detector._logical_worker is None


@pytest.mark.slow
def test_a_batch_larger_than_the_profile_runs_in_chunks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    detector, _ = TINY["tiny_detector"](0)
    apply_backend(detector, "onnx")
    whole = detector.logical_fn
    assert whole.input == onnx.INPUT_NAME  # the name the TensorRT profiles are written for
    chunked = onnx.OrtFunction(whole.path, 1, max_batch=2)
    x = torch.rand(5, 3, detector.map_size, detector.map_size)
    torch.testing.assert_close(chunked(x), whole(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or tensorrt.tensorrt_missing() is not None,
    reason="needs a CUDA device, onnxruntime-gpu's TensorRT provider and TensorRT",
)
def test_tensorrt_on_cuda_equals_eager(tmp_path: Path, monkeypatch) -> None:
    """fp32 engines (TensorRT may use TF32 in them, hence the looser tolerance than onnx's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    detector, _ = TINY["tiny_detector"](0)
    detector = detector.to("cuda")
    batch = torch.randint(0, 256, (3, 40, 50, 3), dtype=torch.uint8)
    eager = detector(batch)
    assert apply_backend(detector, "tensorrt") == "tensorrt"
    got = detector(batch)
    for name in ("fused", "logical", "structural"):
        torch.testing.assert_close(getattr(got, name), getattr(eager, name), rtol=1e-2, atol=1e-2)
