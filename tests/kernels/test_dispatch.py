"""Backend choice of the kernel dispatchers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import triton

from kernels import dispatch
from kernels.dispatch import use_triton
from kernels.triton_support import pick_configs


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        use_triton("cuda", torch.ones(1))


def test_torch_backend_never_uses_triton() -> None:
    assert not use_triton("torch", torch.ones(1))


def test_auto_keeps_cpu_tensors_on_the_reference() -> None:
    assert not use_triton("auto", torch.ones(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_auto_picks_triton_for_cuda_unless_autograd_records() -> None:
    x = torch.ones(2, device="cuda")
    assert use_triton("auto", x)
    assert not use_triton("auto", x.requires_grad_())
    with torch.no_grad():
        assert use_triton("auto", x)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", torch.ones(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton("triton", torch.ones(1))


def test_forced_triton_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        use_triton("triton", torch.ones(1))
    assert not use_triton("auto", torch.ones(1))


def test_configs_with_small_dot_tiles_are_refused() -> None:
    good = triton.Config({"BLOCK_M": 32, "BLOCK_K": 16})
    assert pick_configs([good], good, dot_tiles=("BLOCK_M", "BLOCK_K"))
    with pytest.raises(ValueError, match=r"tl\.dot tiles must be >= 16"):
        pick_configs([good, triton.Config({"BLOCK_M": 8, "BLOCK_K": 16})], good, ("BLOCK_M",))


@pytest.mark.parametrize("name", ["blur", "cosine_maps", "knn", "vq"])
def test_triton_modules_do_not_import_their_reference(name: str) -> None:
    """x_triton.py may use the leaf helper modules, never x.py (which imports x_triton.py)."""
    source = Path(__file__).resolve().parents[2] / "kernels" / f"{name}_triton.py"
    imported = {
        node.module
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.ImportFrom)
    }
    assert f"kernels.{name}" not in imported


def test_autotune_keys_see_the_batch() -> None:
    """Every autotuned kernel's key covers the batch (directly, or in a bucket of rows that
    grows with it), so a config tuned at batch 1 is not reused at batch 32."""
    from kernels import blur_triton, cosine_maps_triton, knn_triton, vq_triton

    batch_keys = {
        blur_triton._blur_axis_kernel: "batch_bucket",
        cosine_maps_triton._cosine_level_kernel: "batch_bucket",
        cosine_maps_triton._upsample_sum_kernel: "batch_bucket",
        knn_triton._knn_partial_kernel: "q_bucket",  # batch x patches query rows
        vq_triton._vq_nearest_kernel: "n_bucket",  # batch x positions vectors
    }
    for kernel, key in batch_keys.items():
        assert key in kernel.keys, (kernel.fn.__name__, kernel.keys)
