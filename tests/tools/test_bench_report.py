"""tools.bench_report: speed-ups against eager from the same run, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import bench_report


def case(name: str, backend: str, p50: float, batch: int = 1, features: str = "compact") -> dict:
    info = {
        "device": "NVIDIA H200", "preset": "paper", "backend": backend, "precision": "fp32",
        "batch": batch, "features": features, "p50_ms": p50, "p95_ms": p50 * 1.1,
        "images_per_s": batch / p50 * 1e3, "first_call_ms": 900.0, "peak_mib": 512.0,
        "max_map_diff_vs_eager": 1e-5,
    }  # fmt: skip
    return {"name": name, "extra_info": info}


def test_speed_up_is_against_eager_at_the_same_batch(tmp_path: Path, capsys) -> None:
    report = {
        "datetime": "2026-11-30T10:00:00",
        "machine_info": {"node": "gpu1", "cpu": {"brand_raw": "EPYC"}},
        "benchmarks": [
            case("test_runtime[eager-fp32-b1]", "eager", 8.0),
            case("test_runtime[compile-fp32-b1]", "compile", 2.0),
            case("test_runtime[eager-fp32-b32]", "eager", 64.0, batch=32),
            case("test_runtime[compile-fp32-b32]", "compile", 16.0, batch=32),
            {"name": "test_vq_kernel", "extra_info": {}},  # not a Runtime case: left out
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    assert bench_report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "on gpu1 (EPYC), 2026-11-30" in out
    lines = [line for line in out.splitlines() if line.startswith("| test_")]
    assert len(lines) == 4
    assert lines[1].endswith("| 4.00× |") and lines[3].endswith("| 4.00× |")
    assert "| 2,000.0 |" in lines[3]  # 32 images in 16 ms


@pytest.mark.parametrize("content", ["not json", json.dumps({"benchmarks": []})])
def test_bad_reports_exit_2(tmp_path: Path, capsys, content: str) -> None:
    path = tmp_path / "bench.json"
    path.write_text(content)
    assert bench_report.main([str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_missing_report_exits_2(tmp_path: Path, capsys) -> None:
    assert bench_report.main([str(tmp_path / "none.json")]) == 2


def test_speed_up_is_against_eager_with_the_same_index() -> None:
    def indexed(name: str, backend: str, p50: float, index: str) -> dict:
        entry = case(name, backend, p50)
        entry["extra_info"]["index"] = index
        return entry

    table = bench_report.rows(
        {
            "benchmarks": [
                indexed("eager-Flat", "eager", 160.0, "Flat"),
                indexed("eager-IVF", "eager", 80.0, "IVF"),
                indexed("onnx-Flat", "onnx", 80.0, "Flat"),
                indexed("onnx-IVF", "onnx", 40.0, "IVF"),
            ]
        }
    )
    assert [row[-1] for row in table] == ["1.00×", "1.00×", "2.00×", "2.00×"]


def test_paired_cases_get_their_own_table(tmp_path: Path, capsys) -> None:
    paired = {
        "backends": ["eager", "onnx"], "rounds": 48, "eager_p50_ms": 160.0, "onnx_p50_ms": 100.0,
        "speedup_median": 1.6, "speedup_ci95": [1.52, 1.67], "max_map_diff_vs_eager": 3e-5,
    }  # fmt: skip
    report = {
        "benchmarks": [
            case("test_runtime[eager-fp32-b1]", "eager", 8.0),
            {
                "name": "test_runtime_real_bank_paired[IVF1024-nprobe8]",
                "extra_info": {"index": "IVF1024-nprobe8", "paired": paired},
            },
        ]
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    assert bench_report.main([str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "paired[" in line)
    assert "first call ms" in out  # the unpaired case's table comes first
    assert "eager 160.0, onnx 100.0" in row
    assert "onnx 1.60× (1.52–1.67×) vs eager" in row
    assert "| 48 |" in row and "3.0e-05" in row


def test_a_report_of_paired_cases_only(tmp_path: Path, capsys) -> None:
    paired = {
        "backends": ["eager", "onnx"], "rounds": 4, "eager_p50_ms": 10.0, "onnx_p50_ms": 5.0,
        "speedup_median": 2.0, "speedup_ci95": [1.9, 2.1], "max_map_diff_vs_eager": 0.0,
    }  # fmt: skip
    report = {"benchmarks": [{"name": "p[x]", "extra_info": {"index": "x", "paired": paired}}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    assert bench_report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "onnx 2.00× (1.90–2.10×) vs eager" in out and "first call ms" not in out
