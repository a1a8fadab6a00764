"""Runtime.load options: 16-bit precision (recorded in results) and which branch maps come back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.data.images import read_rgb
from engine.runtime import Runtime


def test_unknown_precision_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        Runtime.load(tmp_path / "no-artifact", device="cpu", precision="int4")


@pytest.mark.slow
def test_onnx_runs_fp32_only(tiny_build: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    with pytest.raises(NotImplementedError, match="float32 graphs only"):
        Runtime.load(tiny_build["artifact"], device="cpu", backend="onnx", precision="fp16")


@pytest.mark.slow
def test_16_bit_maps_are_close_and_say_their_precision(tiny_build: dict[str, Path]) -> None:
    frame = read_rgb(tiny_build["data"] / "pushpins" / "test" / "good" / "000.png")
    exact = Runtime.load(tiny_build["artifact"], device="cpu")(frame, color="rgb")
    rt = Runtime.load(tiny_build["artifact"], device="cpu", precision="fp16")
    low = rt(frame, color="rgb")
    assert (exact.precision, low.precision) == ("fp32", "fp16") and "fp16" in repr(rt)
    assert not np.array_equal(exact.anomaly_map, low.anomaly_map), "fp16 had no effect"
    spread = float(exact.anomaly_map.max() - exact.anomaly_map.min())
    assert np.abs(exact.anomaly_map - low.anomaly_map).max() <= 0.1 * spread


def test_unknown_branch_map_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="branch_maps must be a subset"):
        Runtime.load(tmp_path / "no-artifact", device="cpu", branch_maps=("fused",))
    with pytest.raises(ValueError, match="branch_maps must be a subset"):
        Runtime.load(tmp_path / "no-artifact", device="cpu", branch_maps="logical")


@pytest.mark.slow
def test_branch_maps_are_copied_only_when_asked(tiny_build: dict[str, Path]) -> None:
    frame = read_rgb(tiny_build["data"] / "pushpins" / "test" / "good" / "000.png")
    full = Runtime.load(tiny_build["artifact"], device="cpu")(frame, color="rgb")
    lean = Runtime.load(tiny_build["artifact"], device="cpu", branch_maps=("structural",))
    result = lean(frame, color="rgb")
    assert result.logical_map is None and result.composition_map is None
    np.testing.assert_array_equal(result.structural_map, full.structural_map)
    np.testing.assert_array_equal(result.anomaly_map, full.anomaly_map)
    assert result.score == full.score


@pytest.mark.slow
def test_warmup_runs_the_batch_shape_asked(tiny_build: dict[str, Path]) -> None:
    rt = Runtime.load(tiny_build["artifact"], device="cpu", backend="eager")
    assert np.isfinite(rt.warmup(size=(48, 64), iterations=1, batch=2))
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        rt.warmup(batch=0)


@pytest.mark.slow
def test_graph_backend_is_refused_on_cpu(tiny_build: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="backend 'graph' captures CUDA graphs"):
        Runtime.load(tiny_build["artifact"], device="cpu", backend="graph")
