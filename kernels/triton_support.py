"""What the Triton wrappers share: input checks, launch device, autotune config choice.

Imported only by the ``*_triton`` modules, so importing :mod:`kernels` never needs Triton.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import triton

# Re-exported for the *_triton modules; defined in the leaf module for the dispatchers too.
from kernels.dispatch import check_no_autograd as check_no_autograd
from kernels.dispatch import interpreter_enabled

# Dtypes every kernel loads; arithmetic is float32 after the load (bf16 must be cast right after
# tl.load anyway: the interpreter computes garbage on raw bf16).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# GPU tl.dot needs every tile dimension >= 16; the interpreter accepts smaller ones, so the
# wrappers check it to make CPU tests catch what the GPU compiler would reject.
MIN_DOT_TILE = 16


def check_float_tensor(name: str, t: object, ndim: int) -> None:
    """Raise ValueError unless ``t`` is a tensor of ``ndim`` dims in :data:`KERNEL_DTYPES`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 or float32"
        )


def check_device(**tensors: torch.Tensor) -> torch.device:
    """The one device all ``tensors`` live on; CPU only under the Triton interpreter."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"inputs must be on one device, got {listing}")
    device = devices.pop()
    if device.type == "cuda":
        return device
    if device.type == "cpu" and interpreter_enabled():
        return device
    raise RuntimeError(
        f"the Triton kernels run on CUDA tensors (got {device}); CPU tensors need "
        "TRITON_INTERPRET=1 set before the kernel modules are imported"
    )


def check_finite(name: str, value: float, positive: bool = False) -> float:
    """``value`` as a float, or ValueError if it is not finite (or not > 0 when ``positive``)."""
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite number" if positive else "finite"
        raise ValueError(f"{name} must be {kind}, got {value}")
    return value


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Launch on ``device``: Triton launches on the current CUDA device, not the tensor's."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def pick_configs(
    gpu: list[triton.Config], interpreter: triton.Config, dot_tiles: tuple[str, ...] = ()
) -> list[triton.Config]:
    """Autotune candidates: the GPU list, or one config under the (slow) interpreter.

    ``dot_tiles`` names the block sizes that are ``tl.dot`` dimensions; every config, the
    interpreter's included, must make them >= :data:`MIN_DOT_TILE`.
    """
    for config in [*gpu, interpreter]:
        small = {n: config.kwargs[n] for n in dot_tiles if config.kwargs[n] < MIN_DOT_TILE}
        if small:
            raise ValueError(f"tl.dot tiles must be >= {MIN_DOT_TILE} on GPU, got {small}")
    return [interpreter] if interpreter_enabled() else gpu


def size_bucket(n: int) -> int:
    """Autotune key for a size that varies per call: its next power of two."""
    return triton.next_power_of_2(max(n, 1))


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (one program at a time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
