"""Device parametrisation for the kernel tests.

Every Triton test runs on CPU under the interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` when there is no GPU) and on CUDA when one is present.
"""

from __future__ import annotations

import pytest
import torch

from kernels.dispatch import interpreter_enabled

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not interpreter_enabled(), reason="CPU Triton runs need TRITON_INTERPRET=1"
        ),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Where the Triton kernel under test runs."""
    return torch.device(request.param)


@pytest.fixture
def gen() -> torch.Generator:
    """Seeded CPU generator: test data is drawn on CPU, then moved."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def as_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors are refused as on a GPU machine (no interpreter): argument errors must still
    come before that device error, so the bad-argument tests pass on every machine."""
    import kernels.triton_support

    monkeypatch.setattr(kernels.triton_support, "interpreter_enabled", lambda: False)
