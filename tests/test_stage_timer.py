"""engine.stage_timer: per-stage times of a Detector call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.data.images import read_rgb
from engine.runtime import Runtime
from engine.stage_timer import StageTimer


def test_cpu_marks_and_misuse() -> None:
    timer = StageTimer(torch.device("cpu"))
    timer.start("a")
    timer.stop("a")
    timer.start("unfinished")
    assert list(timer.elapsed_ms()) == ["a"] and timer.elapsed_ms()["a"] >= 0
    with pytest.raises(RuntimeError, match="stopped without being started"):
        timer.stop("b")


@pytest.mark.slow
def test_every_stage_of_a_runtime_call_is_timed(tiny_build: dict[str, Path]) -> None:
    rt = Runtime.load(tiny_build["artifact"], device="cpu")
    frame = read_rgb(tiny_build["data"] / "pushpins" / "test" / "good" / "000.png")
    rt.detector.stage_timer = timer = StageTimer(rt.device)
    # The CPU default (onnx) runs the logical branch on a worker thread, overlapping the
    # structural stream: every stage timed, in any order of the two branches.
    result = rt(frame, color="rgb")
    stages = timer.elapsed_ms()
    assert sorted(stages) == ["fuse", "logical", "preprocess", "structural"]
    assert all(0 < ms <= result.latency_ms for ms in stages.values())

    rt.detector.overlap_logical(False)
    rt.detector.stage_timer = timer = StageTimer(rt.device)
    result = rt(frame, color="rgb")
    stages = timer.elapsed_ms()
    assert list(stages) == ["preprocess", "structural", "logical", "fuse"]
    assert all(0 < ms <= result.latency_ms for ms in stages.values())
    assert sum(stages.values()) <= result.latency_ms  # one thread: no overlap
