"""The GPU check scripts stop with a clear message, and exit 2, where there is no CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import gpu_probe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def run_check(python: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "OUT": str(out)}
    script = str(ROOT / "tools" / "gpu_check.sh")
    return subprocess.run(
        ["bash", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_gpu_check_without_cuda_says_so(tmp_path: Path) -> None:
    result = run_check(sys.executable, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "needs a CUDA device" in result.stderr
    assert "nothing was run" in (tmp_path / "summary.txt").read_text()


def test_gpu_check_without_torch_says_so(tmp_path: Path) -> None:
    result = run_check("false", tmp_path)
    assert result.returncode == 2 and "cannot import torch" in result.stderr


def test_gpu_probe_without_cuda_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_probe.main(["--artifact", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_throughput_runs_whole_batches(tiny_build: dict[str, Path], monkeypatch) -> None:
    from engine import Runtime

    calls: list[int] = []
    rt = Runtime.load(tiny_build["artifact"], device="cpu", backend="eager")
    run = rt._run
    monkeypatch.setattr(
        rt, "_run", lambda batch, color: calls.append(len(batch)) or run(batch, color)
    )
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # the probe's timing fences
    image = gpu_probe.frame()[:48, :64]
    assert gpu_probe.images_per_second(rt, image, batch=3) > 0
    assert calls == [3] * (2 + gpu_probe.THROUGHPUT_CALLS)  # warm-up, then the timed calls
