"""Gaussian blur and normalise + merge + blur: reference vs scipy, Triton vs reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from kernels.blur import (
    gaussian_blur,
    gaussian_blur_reference,
    normalize_merge_blur,
    normalize_merge_blur_reference,
)
from kernels.blur_triton import gaussian_blur_triton, normalize_merge_blur_triton

STATS_L, STATS_S = (0.2, 1.5), (-0.4, 0.3)


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [
        ((2, 17, 23), 1.0, 4.0),
        ((1, 40, 31), 4.0, 4.0),  # the paper's σ = 4
        ((1, 9, 6), 4.0, 4.0),  # radius 16 > both sides: repeated reflection
        ((1, 12, 12), 0.7, 2.5),
    ],
)
def test_reference_matches_scipy(
    gen: torch.Generator, shape: tuple[int, int, int], sigma: float, truncate: float
) -> None:
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    ref = gaussian_blur_reference(x, sigma, truncate)
    for b in range(shape[0]):
        expected = ndimage.gaussian_filter(x[b].numpy(), sigma, truncate=truncate, mode="reflect")
        np.testing.assert_allclose(ref[b].numpy(), expected, atol=1e-6)


def test_merge_reference_matches_formula(gen: torch.Generator) -> None:
    logical = torch.rand(2, 10, 12, generator=gen)
    structural = torch.rand(2, 10, 12, generator=gen)
    out = normalize_merge_blur_reference(logical, structural, STATS_L, STATS_S, 3.0, 1.0, 2.0)
    merged = 3.0 * (logical - 0.2) / 1.5 + 1.0 * (structural + 0.4) / 0.3
    for b in range(2):
        expected = ndimage.gaussian_filter(merged[b].double().numpy(), 2.0, mode="reflect")
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [
        ((2, 17, 23), 1.0, 4.0),
        ((1, 70, 65), 4.0, 4.0),
        ((1, 9, 6), 4.0, 4.0),
        ((3, 1, 5), 1.5, 3.0),
    ],
)
def test_triton_blur_matches_reference(
    device: torch.device,
    gen: torch.Generator,
    shape: tuple[int, int, int],
    sigma: float,
    truncate: float,
) -> None:
    x = torch.rand(shape, generator=gen)
    out = gaussian_blur_triton(x.to(device), sigma, truncate)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.cpu(), gaussian_blur_reference(x, sigma, truncate))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_blur_half_dtypes(
    device: torch.device, gen: torch.Generator, dtype: torch.dtype
) -> None:
    x = torch.rand(2, 20, 18, generator=gen).to(dtype)
    out = gaussian_blur_triton(x.to(device), 2.0)
    torch.testing.assert_close(out.cpu(), gaussian_blur_reference(x, 2.0), atol=1e-6, rtol=1e-5)


def test_triton_blur_non_contiguous(device: torch.device, gen: torch.Generator) -> None:
    x = torch.rand(2, 30, 40, generator=gen)
    for view in (x.transpose(1, 2), x[:, 1::2, ::3]):
        out = gaussian_blur_triton(view.to(device), 1.5)
        torch.testing.assert_close(out.cpu(), gaussian_blur_reference(view, 1.5))


@pytest.mark.parametrize("structural_size", [(24, 20), (7, 5)])  # same size, and resized
def test_triton_merge_matches_reference(
    device: torch.device, gen: torch.Generator, structural_size: tuple[int, int]
) -> None:
    logical = torch.rand(2, 24, 20, generator=gen)
    structural = torch.rand(2, *structural_size, generator=gen)
    ref = normalize_merge_blur_reference(logical, structural, STATS_L, STATS_S, 3.0, 1.0, 4.0)
    out = normalize_merge_blur_triton(
        logical.to(device), structural.to(device), STATS_L, STATS_S, 3.0, 1.0, 4.0
    )
    assert out.shape == logical.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_triton_merge_mixed_dtypes_and_strides(device: torch.device, gen: torch.Generator) -> None:
    logical = torch.rand(2, 16, 22, generator=gen).half()
    structural = torch.rand(2, 22, 16, generator=gen).transpose(1, 2)
    ref = normalize_merge_blur_reference(logical, structural, STATS_L, STATS_S, 2.0, 0.5, 1.0)
    out = normalize_merge_blur_triton(
        logical.to(device), structural.to(device), STATS_L, STATS_S, 2.0, 0.5, 1.0
    )
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_triton_merge_weights_matter(device: torch.device, gen: torch.Generator) -> None:
    """Zero structural weight leaves the blurred, normalised logical map alone."""
    logical = torch.rand(1, 12, 12, generator=gen)
    structural = torch.rand(1, 12, 12, generator=gen)
    out = normalize_merge_blur_triton(
        logical.to(device), structural.to(device), STATS_L, STATS_S, 3.0, 0.0, 1.0
    )
    expected = gaussian_blur_reference(3.0 * (logical - 0.2) / 1.5, 1.0)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_dispatchers_forced_triton(device: torch.device, gen: torch.Generator) -> None:
    x = torch.rand(1, 10, 11, generator=gen)
    out = gaussian_blur(x.to(device), 1.0, backend="triton")
    torch.testing.assert_close(out.cpu(), gaussian_blur_reference(x, 1.0))
    resized = F.interpolate(x[:, None], size=(5, 6), mode="bilinear")[:, 0]
    out = normalize_merge_blur(x.to(device), resized.to(device), STATS_L, STATS_S, backend="triton")
    ref = normalize_merge_blur_reference(x, resized, STATS_L, STATS_S)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("x", "sigma", "message"),
    [
        (torch.ones(4, 4), 1.0, "must have 3 dims"),
        (torch.ones(1, 0, 4), 1.0, "empty spatial dim"),
        (torch.ones(1, 4, 4, dtype=torch.int64), 1.0, "dtype torch.int64"),
        (torch.ones(1, 4, 4), 0.0, "sigma must be a positive"),
        (torch.ones(1, 4, 4), float("inf"), "sigma must be a positive"),
    ],
)
def test_triton_blur_bad_arguments(x: torch.Tensor, sigma: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gaussian_blur_triton(x, sigma)


@pytest.mark.parametrize(
    ("structural", "stats_s", "weight_s", "message"),
    [
        (torch.ones(2, 4, 4), STATS_S, 1.0, "batch"),
        (torch.ones(1, 4), STATS_S, 1.0, "structural must have 3 dims"),
        (torch.ones(1, 4, 4), (0.0, 0.0), 1.0, "positive finite std"),
        (torch.ones(1, 4, 4), (float("nan"), 1.0), 1.0, "structural branch"),
        (torch.ones(1, 4, 4), (0.0, 1.0, 2.0), 1.0, r"must be \(mean, std\)"),
        (torch.ones(1, 4, 4), STATS_S, float("inf"), "finite weight"),
    ],
)
def test_triton_merge_bad_arguments(
    structural: torch.Tensor, stats_s: tuple[float, ...], weight_s: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_merge_blur_triton(
            torch.ones(1, 4, 4), structural, STATS_L, stats_s, 3.0, weight_s
        )


def test_triton_refuses_autograd() -> None:
    x = torch.ones(1, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        gaussian_blur_triton(x)
    with pytest.raises(RuntimeError, match="no backward"):
        normalize_merge_blur_triton(x, torch.ones(1, 4, 4), STATS_L, STATS_S)
