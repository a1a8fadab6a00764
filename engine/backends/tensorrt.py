"""The ``tensorrt`` backend: the ``onnx`` backend's graphs built into TensorRT engines by ONNX
Runtime's TensorRT execution provider (TensorRT's own ONNX parser), on CUDA.

Everything but the provider is the ``onnx`` backend's (:mod:`engine.backends.onnx`): the same
exported graphs and cache, tensors bound in place on the GPU, the memory-bank search and fusion
in PyTorch. Each graph gets one optimisation profile, batch 1 to :data:`TRT_MAX_BATCH` tuned
for batch 1 (larger batches run in chunks); the engines are built in the Runtime's precision
(``fp16`` and ``bf16`` enable TensorRT's reduced-precision kernels, ``fp32`` keeps float32; INT8
needs a calibration table and is not offered) and cached beside the graphs they come from (the
ONNX cache folder is keyed by the artifact's weights), in a folder named by GPU model, TensorRT
version and precision, so another TensorRT or GPU model never meets a stale engine. Nodes
TensorRT does not take fall back to ONNX Runtime's CUDA provider.

Needs ``onnxruntime-gpu`` (whose build carries the TensorRT provider) and the ``tensorrt``
package (its libraries). **Not yet run**: no machine this project has tested on had TensorRT
(docs/PERFORMANCE.md); what is tested is how the providers are configured and every refusal.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from engine.backends.onnx import (
    INPUT_NAME,
    apply_onnx,
    cuda_index,
    default_providers,
    onnx_available,
    onnx_providers,
)
from engine.detector import Detector

TRT_MAX_BATCH = 32  # the optimisation profile's largest batch (the runtime benchmark's)
PROVIDER = "TensorrtExecutionProvider"


def tensorrt_missing() -> str | None:
    """Why the backend cannot run here (the missing package or provider), or None."""
    if not onnx_available():
        return "onnxruntime-gpu and onnxscript (the 'onnx' extra with onnxruntime-gpu)"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package (TensorRT's libraries)"
    if PROVIDER not in onnx_providers():
        return f"ONNX Runtime's {PROVIDER} (onnxruntime-gpu; this one has {onnx_providers()})"
    return None


def engine_folder(graphs: Path, gpu: str, tensorrt_version: str, precision: str) -> Path:
    """Where the engines of the graphs in ``graphs`` are cached for this GPU model, TensorRT
    version and precision."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") or "gpu"
    return graphs / "tensorrt" / f"{slug}-trt{tensorrt_version}-{precision}"


def provider_options(
    device_id: int, precision: str, cache: Path, input_name: str, size: int
) -> dict[str, object]:
    """The TensorRT provider's options for a graph of (B, 3, ``size``, ``size``) inputs named
    ``input_name``, built in ``precision`` and cached in ``cache``."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"backend 'tensorrt' builds fp32, fp16 or bf16 engines, got {precision!r}")

    def shape(batch: int) -> str:
        return f"{input_name}:{batch}x3x{size}x{size}"

    options: dict[str, object] = {
        "device_id": device_id,
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(1),
        "trt_profile_max_shapes": shape(TRT_MAX_BATCH),
    }
    if precision == "bf16":  # a newer option: only named where it is asked for
        options["trt_bf16_enable"] = True
    return options


def apply_tensorrt(detector: Detector) -> None:
    """Swap the networks of ``detector`` (on CUDA) for TensorRT engines run by ONNX Runtime,
    built now or read from the cache. RuntimeError where ONNX Runtime could not give a graph to
    the TensorRT provider (its libraries missing: ONNX Runtime would silently run it on CUDA)."""
    import tensorrt

    device = detector.device
    gpu = torch.cuda.get_device_name(device)
    device_id = cuda_index(device)
    # What TensorRT does not take runs where backend 'onnx' would run it on this GPU.
    fallback = default_providers(torch.device("cuda", device_id))

    def providers(path: Path, size: int) -> list:
        cache = engine_folder(path.parent, gpu, tensorrt.__version__, detector.precision)
        cache.mkdir(parents=True, exist_ok=True)
        options = provider_options(device_id, detector.precision, cache, INPUT_NAME, size)
        return [(PROVIDER, options), *fallback]

    apply_onnx(detector, providers, TRT_MAX_BATCH)
    sessions = [detector.logical_fn, *detector.structural_side.features_fn.functions()]
    for function in sessions:
        used = function.session.get_providers()
        if PROVIDER not in used:
            raise RuntimeError(
                f"ONNX Runtime did not run {function.path.name} on TensorRT (providers in use: "
                f"{used}); check that TensorRT's libraries load (the tensorrt package matching "
                "this onnxruntime-gpu), or use backend 'onnx' or 'compile'"
            )
