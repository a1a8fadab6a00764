"""Execution backends for a :class:`~engine.detector.Detector`'s two networks.

``eager`` runs the PyTorch modules as they are (the reference every other backend is compared
with). ``compile`` folds the BatchNorms into their convolutions and wraps both branch functions
in ``torch.compile`` (Inductor; CUDA graphs with ``mode="reduce-overhead"`` on GPU). ``graph``
(CUDA only) folds the BatchNorms and has the Runtime capture the whole frame, eager modules and
all, as one CUDA graph per frame shape (:mod:`engine.frame_graph`); it needs the memory bank
searched on the GPU (no FAISS index) and is not yet measured on a GPU. ``onnx``
runs both networks in ONNX Runtime, on CPU or, with the ``onnxruntime-gpu`` build, on CUDA (not
yet run on a GPU; see :mod:`engine.backends.onnx`). ``tensorrt`` (CUDA only) builds the
``onnx`` backend's graphs into TensorRT engines through ONNX Runtime's TensorRT provider, in
the Runtime's precision (:mod:`engine.backends.tensorrt`; not yet run: no machine tested on had
TensorRT). ``auto`` picks ``compile`` on CUDA (``tensorrt`` is not chosen before it is
measured); on CPU it picks ``onnx`` for float32 when ONNX Runtime is installed (it runs the
networks about 3x faster than eager PyTorch there; docs/PERFORMANCE.md), falling back to
``eager`` with a warning if the export fails, and ``eager`` otherwise (``torch.compile`` costs
minutes on small machines and gains little).
"""

from __future__ import annotations

import logging

import torch

from engine.backends.onnx import (
    apply_onnx,
    onnx_available,
    onnx_cuda_available,
    onnx_providers,
)
from engine.backends.tensorrt import apply_tensorrt, tensorrt_missing
from engine.detector import Detector

BACKENDS = ("auto", "eager", "compile", "graph", "onnx", "tensorrt")
log = logging.getLogger(__name__)


def resolve_backend(name: str, device: torch.device, precision: str = "fp32") -> str:
    """The concrete backend ``name`` stands for on ``device`` at ``precision``; errors for
    unavailable ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        if device.type == "cuda":
            return "compile"
        return "onnx" if precision == "fp32" and onnx_available() else "eager"
    if name == "tensorrt":
        if device.type != "cuda":
            raise RuntimeError(
                f"backend 'tensorrt' builds TensorRT engines and needs a CUDA device, got "
                f"{device}; use 'onnx' or 'eager' on CPU"
            )
        missing = tensorrt_missing()
        if missing is not None:
            raise RuntimeError(
                f"backend 'tensorrt' needs {missing}, which is not installed; use backend "
                "'compile' or 'eager'"
            )
    if name == "graph" and device.type != "cuda":
        raise RuntimeError(
            f"backend 'graph' captures CUDA graphs and needs a CUDA device, got {device}; use "
            "'onnx' or 'eager' on CPU"
        )
    if name == "onnx":
        if not onnx_available():
            raise RuntimeError(
                "backend 'onnx' needs onnxruntime and onnxscript (the project's 'onnx' extra), "
                "which are not installed; use backend='eager'"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend 'onnx' runs on CPU or CUDA, got {device}")
        if device.type == "cuda" and not onnx_cuda_available():
            raise RuntimeError(
                "backend 'onnx' on CUDA needs ONNX Runtime's CUDA provider (the onnxruntime-gpu "
                f"package); this onnxruntime has {onnx_providers()}: use 'compile' or 'eager'"
            )
    return name


def apply_backend(detector: Detector, name: str) -> str:
    """Install backend ``name`` into ``detector`` (already on its device); returns the one used."""
    chosen = resolve_backend(name, detector.device, detector.precision)
    if chosen == "onnx" and detector.precision != "fp32":
        raise NotImplementedError(
            f"backend 'onnx' runs float32 graphs only in this version; precision "
            f"{detector.precision!r} needs backend 'eager' or 'compile'"
        )
    _install_eager(detector)
    if chosen == "onnx":
        return _install_onnx(detector, fall_back=name == "auto")
    if chosen == "tensorrt":
        try:
            apply_tensorrt(detector)
        except Exception:
            _install_eager(detector)  # a refused engine leaves no half-installed sessions
            raise
        return chosen
    if chosen == "graph":
        index = detector.structural.index
        if index is not None:
            raise RuntimeError(
                f"backend 'graph' captures the memory-bank search in the CUDA graph, but this "
                f"detector searches a FAISS index ({index.spec!r}) through the host; load the "
                "artifact with its exact bank searched on the GPU (structural.index 'auto' or "
                "'torch'), or use backend 'compile' or 'eager'"
            )
        detector.fold_batchnorm()
    if chosen == "compile":
        detector.fold_batchnorm()
        mode = "reduce-overhead" if detector.device.type == "cuda" else None
        detector.logical_fn = torch.compile(detector.logical.anomaly_map, mode=mode)
        detector.structural_fn = torch.compile(detector.structural_side, mode=mode)
    return chosen


def _install_eager(detector: Detector) -> None:
    detector.overlap_logical(False)
    detector.structural_side.features_fn = None
    detector.logical_fn = detector.logical.anomaly_map
    detector.structural_fn = detector.structural_side


def _install_onnx(detector: Detector, fall_back: bool) -> str:
    """``onnx`` installed; with ``fall_back`` (backend ``auto``) an export that fails for any
    reason leaves ``eager`` in place, with a warning, instead of no engine."""
    try:
        apply_onnx(detector)
    except Exception as error:
        if not fall_back:
            raise
        log.warning("ONNX export failed (%s); backend 'auto' falls back to 'eager'", error)
        _install_eager(detector)
        return "eager"
    return "onnx"
