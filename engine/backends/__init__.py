"""Execution backends for a :class:`~engine.detector.Detector`'s two networks.

``eager`` runs the PyTorch modules as they are (the reference every other backend is compared
with). ``compile`` wraps both branch functions in ``torch.compile`` (Inductor; CUDA graphs with
``mode="reduce-overhead"`` on GPU). ``onnx`` runs both networks in ONNX Runtime on CPU (see
:mod:`engine.backends.onnx`). ``tensorrt`` is not implemented in this version and says so.
``auto`` picks ``compile`` on CUDA and ``eager`` on CPU, where compilation costs minutes on
small machines and gains little.
"""

from __future__ import annotations

import importlib.util

import torch

from engine.backends.onnx import apply_onnx, onnx_available
from engine.detector import Detector

BACKENDS = ("auto", "eager", "compile", "onnx", "tensorrt")


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend ``name`` stands for on ``device``; errors for unavailable ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return "compile" if device.type == "cuda" else "eager"
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise RuntimeError(
                "backend 'tensorrt' needs the tensorrt package (the project's 'trt' extra), which "
                "is not installed; use backend='compile' or 'eager'"
            )
        raise NotImplementedError(
            "backend 'tensorrt' is not implemented in this version; use 'compile' or 'eager'"
        )
    if name == "onnx":
        if not onnx_available():
            raise RuntimeError(
                "backend 'onnx' needs onnxruntime and onnxscript (the project's 'onnx' extra), "
                "which are not installed; use backend='eager'"
            )
        if device.type != "cpu":
            raise NotImplementedError(
                "backend 'onnx' runs on CPU only in this version (no CUDA provider or IO "
                "binding); use 'compile' or 'eager' on CUDA"
            )
    return name


def apply_backend(detector: Detector, name: str) -> str:
    """Install backend ``name`` into ``detector`` (already on its device); returns the one used."""
    chosen = resolve_backend(name, detector.device)
    if chosen == "onnx" and detector.precision != "fp32":
        raise NotImplementedError(
            f"backend 'onnx' runs float32 graphs only in this version; precision "
            f"{detector.precision!r} needs backend 'eager' or 'compile'"
        )
    detector.structural_side.features_fn = None
    if chosen == "onnx":
        apply_onnx(detector)
    elif chosen == "compile":
        mode = "reduce-overhead" if detector.device.type == "cuda" else None
        detector.logical_fn = torch.compile(detector.logical.anomaly_map, mode=mode)
        detector.structural_fn = torch.compile(detector.structural_side, mode=mode)
    else:
        detector.logical_fn = detector.logical.anomaly_map
        detector.structural_fn = detector.structural_side
    return chosen
