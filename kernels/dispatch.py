"""Backend choice shared by the kernel dispatchers."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Triton's CPU interpreter; read by ``@triton.jit`` when the kernel module is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether a dispatcher should launch its Triton kernel for these tensors.

    ``auto`` means Triton for CUDA tensors and the PyTorch reference for everything else,
    including when autograd records through the inputs (the kernels have no backward);
    ``triton`` forces the kernel (CPU tensors then need ``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' was requested but the triton package is not installed"
            )
        if not all(t.is_cuda for t in tensors) and not interpreter_enabled():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before kernels are imported"
            )
        return True
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return triton_available() and all(t.is_cuda for t in tensors) and not needs_grad


def check_no_autograd(name: str, *tensors: torch.Tensor) -> None:
    """The kernels have no backward: refuse rather than return a result that drops gradients."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{name} has no backward pass; call it under torch.no_grad() or use the "
            "PyTorch reference (backend='torch') when gradients are needed"
        )
