"""Gaussian blur (σ = 4) and normalise + merge + blur at the engine's 256² model resolution.

Reference vs Triton side by side; the Triton rows skip without a CUDA GPU (the CPU interpreter
is not a speed figure). The merge runs on 2 maps (paper preset: logical, structural) and 3 maps
(with the composition branch), at batch 1 and 8. Run: ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels.blur import gaussian_blur_reference, normalize_merge_blur_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NEEDS_GPU = pytest.mark.skipif(
    not CUDA, reason="Triton speed needs a CUDA GPU (the CPU interpreter is not a speed figure)"
)
SIDE = 256
# (weight, mean, std) of the logical, structural and composition branches.
AFFINES = [(3.0, 0.5, 0.2), (1.0, 1.0, 0.4), (1.0, 0.0, 1.0)]
MERGE_CASES = pytest.mark.parametrize(
    ("count", "batch"),
    [(2, 1), (2, 8), (3, 1), (3, 8)],
    ids=["2maps-B1", "2maps-B8", "3maps-B1", "3maps-B8"],
)


def maps(count: int, batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(batch, SIDE, SIDE, generator=gen).to(DEVICE) for _ in range(count)]


@pytest.mark.parametrize("batch", [1, 8])
def test_blur_reference(benchmark: Any, timed: Any, batch: int) -> None:
    benchmark.group = f"blur 256 B={batch}"
    (x,) = maps(1, batch)
    timed(benchmark, lambda: gaussian_blur_reference(x, 4.0))


@NEEDS_GPU
@pytest.mark.parametrize("batch", [1, 8])
def test_blur_triton(benchmark: Any, timed: Any, batch: int) -> None:
    from kernels.blur_triton import gaussian_blur_triton

    benchmark.group = f"blur 256 B={batch}"
    (x,) = maps(1, batch)
    out = timed(benchmark, lambda: gaussian_blur_triton(x, 4.0))
    torch.testing.assert_close(out, gaussian_blur_reference(x, 4.0), atol=1e-5, rtol=1e-5)


@MERGE_CASES
def test_merge_blur_reference(benchmark: Any, timed: Any, count: int, batch: int) -> None:
    benchmark.group = f"normalize+merge+blur 256 {count} maps B={batch}"
    inputs, affines = maps(count, batch), AFFINES[:count]
    timed(benchmark, lambda: normalize_merge_blur_reference(inputs, affines))


@NEEDS_GPU
@MERGE_CASES
def test_merge_blur_triton(benchmark: Any, timed: Any, count: int, batch: int) -> None:
    from kernels.blur_triton import normalize_merge_blur_triton

    benchmark.group = f"normalize+merge+blur 256 {count} maps B={batch}"
    inputs, affines = maps(count, batch), AFFINES[:count]
    out = timed(benchmark, lambda: normalize_merge_blur_triton(inputs, affines))
    ref = normalize_merge_blur_reference(inputs, affines)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
