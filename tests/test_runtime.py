"""engine.Runtime on the tiny build: maps equal the build's, and bad input gets clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.artifact import ArtifactError
from engine.data.images import read_rgb
from engine.data.loco import LocoDataset
from engine.metrics import find_map, read_map
from engine.runtime import Runtime

pytestmark = pytest.mark.slow

# Runtime and build run the same Detector on the same weights; only batch composition differs
# (build: 8 images per batch, here: 1), which moves float32 results by rounding noise.
MAP_ATOL = 1e-4
MAP_RTOL = 1e-5  # maps reach tens of units: rounding noise scales with them


@pytest.fixture(scope="module")
def rt(tiny_build: dict[str, Path]) -> Runtime:
    # eager: the backend the build scored with (``auto`` would pick onnx on CPU).
    return Runtime.load(tiny_build["artifact"], device="cpu", backend="eager")


@pytest.fixture(scope="module")
def frame(tiny_build: dict[str, Path]) -> np.ndarray:
    return read_rgb(tiny_build["data"] / "pushpins" / "test" / "good" / "000.png")


def test_runtime_maps_equal_the_build_maps(rt: Runtime, tiny_build: dict[str, Path]) -> None:
    dataset = LocoDataset(tiny_build["data"], "pushpins")
    for sample in dataset.samples("test"):
        result = rt(read_rgb(sample.image_path), color="rgb")
        expected = read_map(find_map(tiny_build["maps"], sample))
        assert result.anomaly_map.shape == expected.shape
        np.testing.assert_allclose(result.anomaly_map, expected, atol=MAP_ATOL, rtol=MAP_RTOL)
        assert result.score == pytest.approx(float(expected.max()), abs=MAP_ATOL, rel=MAP_RTOL)
        assert result.is_anomalous == (result.score > rt.threshold)


def test_bgr_input_is_flipped(rt: Runtime, frame: np.ndarray) -> None:
    rgb = rt(frame, color="rgb")
    bgr = rt(np.ascontiguousarray(frame[..., ::-1]))
    np.testing.assert_allclose(rgb.anomaly_map, bgr.anomaly_map, atol=MAP_ATOL)


def test_list_and_tensor_batches_match_single_frames(rt: Runtime, frame: np.ndarray) -> None:
    small = np.ascontiguousarray(frame[:60, :90])
    single = [rt(frame, color="rgb"), rt(small, color="rgb")]
    listed = rt([frame, small], color="rgb")
    assert [r.source_index for r in listed] == [0, 1]
    for a, b in zip(single, listed, strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=MAP_ATOL)
    batch = rt(torch.from_numpy(np.stack([frame, frame])), color="rgb")
    assert len(batch) == 2
    np.testing.assert_allclose(batch[1].anomaly_map, single[0].anomaly_map, atol=MAP_ATOL)
    assert small.shape[:2] == listed[1].anomaly_map.shape
    assert listed[0].logical_map.shape == (64, 64) and listed[0].latency_ms > 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((20, 30), np.uint8), r"shape \(H, W, 3\).*grayscale"),
        (np.zeros((20, 30, 4), np.uint8), "RGBA"),
        (np.zeros((20, 30, 3), np.float32), "dtype uint8"),
        (np.full((20, 30, 3), np.nan, np.float32), "NaN"),
        (np.zeros((0, 30, 3), np.uint8), "empty frame"),
        ("frame.png", "numpy array"),
        ([], "empty list"),
        (torch.zeros(2, 3, 20, 30, dtype=torch.uint8), r"\(B, H, W, 3\)"),
        (torch.full((1, 20, 30, 3), float("nan")), "NaN"),
    ],
)
def test_bad_frames_are_refused(rt: Runtime, bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rt(bad)


def test_bad_color_is_refused(rt: Runtime, frame: np.ndarray) -> None:
    with pytest.raises(ValueError, match="color"):
        rt(frame, color="hsv")


def test_stream_skips_bad_frames_and_carries_on(
    rt: Runtime, frame: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    frames = [frame, np.zeros((5, 5), np.uint8), frame]
    with caplog.at_level(logging.WARNING, logger="engine.runtime"):
        results = [r for _, r in rt.stream(frames, color="rgb")]
    assert [r.source_index for r in results] == [0, 2]
    assert "skipping frame 1" in caplog.text


def test_stream_reads_an_image_folder(rt: Runtime, frame: np.ndarray, tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(frame).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    Image.fromarray(frame).save(tmp_path / "c.png")
    results = [r for _, r in rt.stream(tmp_path)]
    assert [r.source_index for r in results] == [0, 2]
    np.testing.assert_allclose(results[0].anomaly_map, rt(frame, color="rgb").anomaly_map)


def test_unreadable_video_source(rt: Runtime, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such video file"):
        next(rt.stream(tmp_path / "missing.mp4"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot open video source"):
        next(rt.stream(broken))
    with pytest.raises(ValueError, match="unsupported stream source"):
        next(rt.stream(3.5))


def test_overlay_marks_the_verdict(rt: Runtime, frame: np.ndarray) -> None:
    result = rt(frame, color="rgb")
    drawn = engine.overlay(frame, result, color="rgb")
    assert drawn.shape == frame.shape and drawn.dtype == np.uint8
    assert not np.array_equal(drawn, frame)
    with pytest.raises(ValueError, match="does not match"):
        engine.overlay(frame[:10], result, color="rgb")


def test_threshold_override(tiny_build: dict[str, Path], frame: np.ndarray) -> None:
    low = Runtime.load(tiny_build["artifact"], device="cpu", threshold=-1e9)
    assert low(frame, color="rgb").is_anomalous
    assert low.threshold == low.detector.fusion.threshold.item() == -1e9
    low.threshold = 0.3  # held by the fusion module's buffer, exactly
    assert low.threshold == low.detector.fusion.threshold.item() == 0.3


def test_tampered_artifact_refuses_to_load(tiny_build: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(tiny_build["artifact"], copy)
    weights = copy / "logical.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Runtime.load(copy, device="cpu")
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        Runtime.load(copy, device="cpu")


def test_unavailable_backends_say_so(tiny_build: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="'tensorrt' builds TensorRT engines and needs a CUDA"):
        Runtime.load(tiny_build["artifact"], device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="unknown backend"):
        Runtime.load(tiny_build["artifact"], device="cpu", backend="fast")


@pytest.mark.slow
def test_onnx_backend_gives_the_eager_maps(
    tiny_build: dict[str, Path], rt: Runtime, frame: np.ndarray, tmp_path: Path, monkeypatch
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    onnx = Runtime.load(tiny_build["artifact"], device="cpu", backend="onnx")
    assert onnx.backend == "onnx"
    got, want = onnx(frame), rt(frame)
    for name in ("anomaly_map", "logical_map", "structural_map"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)
    assert got.score == pytest.approx(want.score, rel=1e-4)


def test_faiss_and_torch_search_give_the_same_maps(rt: Runtime, frame: np.ndarray) -> None:
    from engine.models.structural import attach_index

    structural = rt.detector.structural
    try:
        assert attach_index(structural, "Flat", "cpu") == "Flat"
        with_faiss = rt(frame, color="rgb")
        assert attach_index(structural, "torch", "cpu") == "torch"
        with_torch = rt(frame, color="rgb")
    finally:
        attach_index(structural, "auto", "cpu")
    # Euclidean distances agree to ~1e-4 (float32 FAISS vs the expanded-norm torch kernel).
    np.testing.assert_allclose(with_faiss.structural_map, with_torch.structural_map, atol=1e-3)
    np.testing.assert_allclose(with_faiss.anomaly_map, with_torch.anomaly_map, atol=1e-3)


def test_frame_of_height_3_is_not_an_ambiguous_layout(rt: Runtime, frame: np.ndarray) -> None:
    thin = np.ascontiguousarray(frame[:3])  # (3, W, 3): looks like (3, H, W) to a layout guess
    result = rt(thin, color="rgb")
    assert result.anomaly_map.shape == thin.shape[:2]
    assert [r.source_index for _, r in rt.stream([thin, thin], color="rgb")] == [0, 1]


def test_color_convention_bgr_view_equals_rgb(rt: Runtime, frame: np.ndarray, tmp_path) -> None:
    from PIL import Image

    expected = rt(frame, color="rgb")
    bgr_view = frame[..., ::-1]  # negative strides, not copied
    np.testing.assert_allclose(rt(bgr_view).anomaly_map, expected.anomaly_map, atol=MAP_ATOL)
    Image.fromarray(frame).save(tmp_path / "a.png")
    (from_folder,) = [r for _, r in rt.stream(tmp_path)]  # image folders are read as RGB
    (from_bgr,) = [r for _, r in rt.stream([bgr_view])]  # iterables are BGR by default
    assert from_folder.score == pytest.approx(expected.score, abs=MAP_ATOL)
    assert from_bgr.score == pytest.approx(expected.score, abs=MAP_ATOL)


def test_a_concurrent_call_raises(rt: Runtime, frame: np.ndarray, monkeypatch) -> None:
    import threading

    entered, leave = threading.Event(), threading.Event()
    logical_fn = rt.detector.logical_fn

    def slow_logical(x: torch.Tensor) -> torch.Tensor:
        entered.set()
        assert leave.wait(30)
        return logical_fn(x)

    monkeypatch.setattr(rt.detector, "logical_fn", slow_logical)
    results: list = []
    worker = threading.Thread(target=lambda: results.append(rt(frame, color="rgb")))
    worker.start()
    try:
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match="already running in another thread"):
            rt(frame, color="rgb")
    finally:
        leave.set()
        worker.join(30)
    assert len(results) == 1 and np.isfinite(results[0].score)


def test_nan_bank_is_an_error_not_ok(tiny_build: dict[str, Path], frame: np.ndarray) -> None:
    from engine.models.structural import attach_index

    broken = Runtime.load(tiny_build["artifact"], device="cpu")
    structural = broken.detector.structural
    structural.bank.fill_(float("nan"))  # injected after loading, past the artifact checks
    attach_index(structural, "torch", "cpu")
    with pytest.raises(RuntimeError, match="non-finite scores"):
        broken(frame, color="rgb")
    with pytest.raises(RuntimeError, match="non-finite scores"):
        next(broken.stream([frame], color="rgb"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_threshold_override_is_refused(tiny_build: dict[str, Path], bad: float) -> None:
    with pytest.raises(ValueError, match="threshold must be finite"):
        Runtime.load(tiny_build["artifact"], device="cpu", threshold=bad)
