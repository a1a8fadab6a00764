"""Gaussian blur and normalise + merge + blur: reference vs scipy, Triton vs reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import ndimage

from kernels.blur import (
    gaussian_blur,
    gaussian_blur_reference,
    normalize_merge_blur,
    normalize_merge_blur_reference,
)
from kernels.blur_triton import gaussian_blur_triton, normalize_merge_blur_triton

# (weight, mean, std) of the logical, structural and composition branches.
AFFINES = [(3.0, 0.2, 1.5), (1.0, -0.4, 0.3), (0.5, 2.0, 0.7), (2.0, -1.0, 2.5)]


def rand_maps(gen: torch.Generator, count: int, shape: tuple[int, int, int]) -> list[torch.Tensor]:
    # Distinct ranges per map so that a slot reading another slot's map is seen.
    return [torch.rand(shape, generator=gen) * (i + 1) for i in range(count)]


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


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_merge_reference_matches_scipy(gen: torch.Generator, count: int) -> None:
    maps = rand_maps(gen, count, (2, 10, 13))
    out = normalize_merge_blur_reference(maps, AFFINES[:count], 2.0)
    assert out.shape == (2, 10, 13) and out.dtype == torch.float32
    merged = sum(
        w * (m.double().numpy() - mu) / sd for m, (w, mu, sd) in zip(maps, AFFINES[:count])
    )
    for b in range(2):
        expected = ndimage.gaussian_filter(merged[b], 2.0, mode="reflect")
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


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((2, 13, 11), 1.5), ((1, 9, 7), 4.0)],  # odd sizes; radius 16 > both sides
)
def test_triton_merge_matches_reference(
    device: torch.device,
    gen: torch.Generator,
    count: int,
    shape: tuple[int, int, int],
    sigma: float,
) -> None:
    maps = rand_maps(gen, count, shape)
    ref = normalize_merge_blur_reference(maps, AFFINES[:count], sigma)
    out = normalize_merge_blur_triton([m.to(device) for m in maps], AFFINES[:count], sigma)
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_triton_merge_mixed_dtypes(device: torch.device, gen: torch.Generator) -> None:
    maps = rand_maps(gen, 4, (2, 11, 14))
    maps = [maps[0].half(), maps[1].bfloat16(), maps[2], maps[3].half()]
    ref = normalize_merge_blur_reference(maps, AFFINES, 1.0)
    out = normalize_merge_blur_triton([m.to(device) for m in maps], AFFINES, 1.0)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_triton_merge_non_contiguous(device: torch.device, gen: torch.Generator) -> None:
    """Each slot gets its own strides: transposed, sliced, and batch-broadcast (stride 0)."""
    shape = (2, 9, 12)
    transposed = torch.rand(2, 12, 9, generator=gen).transpose(1, 2)
    sliced = torch.rand(2, 18, 37, generator=gen)[:, ::2, 1::3]
    broadcast = torch.rand(1, *shape[1:], generator=gen).expand(shape)
    batch_last = torch.rand(*shape[1:], 2, generator=gen).permute(2, 0, 1)
    maps = [transposed, sliced, broadcast, batch_last]
    assert all(m.shape == shape and not m.is_contiguous() for m in maps)
    ref = normalize_merge_blur_reference(maps, AFFINES, 1.5)
    out = normalize_merge_blur_triton([m.to(device) for m in maps], AFFINES, 1.5)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_triton_merge_weights_matter(device: torch.device, gen: torch.Generator) -> None:
    """Zero weights on two maps leave the blurred, normalised third map alone."""
    maps = rand_maps(gen, 3, (1, 12, 12))
    affines = [(0.0, 0.2, 1.5), (0.0, -0.4, 0.3), (0.5, 2.0, 0.7)]
    out = normalize_merge_blur_triton([m.to(device) for m in maps], affines, 1.0)
    expected = gaussian_blur_reference(0.5 * (maps[2] - 2.0) / 0.7, 1.0)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_dispatchers_forced_triton(device: torch.device, gen: torch.Generator) -> None:
    x = torch.rand(1, 10, 11, generator=gen)
    out = gaussian_blur(x.to(device), 1.0, backend="triton")
    torch.testing.assert_close(out.cpu(), gaussian_blur_reference(x, 1.0))
    maps = rand_maps(gen, 4, (1, 10, 11))
    out = normalize_merge_blur([m.to(device) for m in maps], AFFINES, backend="triton")
    ref = normalize_merge_blur_reference(maps, AFFINES)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_dispatcher_torch_backend_is_reference(gen: torch.Generator) -> None:
    maps = rand_maps(gen, 2, (1, 8, 9))
    out = normalize_merge_blur(maps, AFFINES[:2], 2.0, backend="torch")
    torch.testing.assert_close(out, normalize_merge_blur_reference(maps, AFFINES[:2], 2.0))


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
@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_blur_bad_arguments(x: torch.Tensor, sigma: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gaussian_blur_triton(x, sigma)


MERGE_FUNCTIONS = {
    "reference": normalize_merge_blur_reference,
    "triton": normalize_merge_blur_triton,
    "dispatcher": normalize_merge_blur,
}
ONE = torch.ones(1, 4, 4)
GOOD = (1.0, 0.0, 1.0)


@pytest.mark.parametrize("function", MERGE_FUNCTIONS.values(), ids=MERGE_FUNCTIONS.keys())
@pytest.mark.parametrize(
    ("maps", "affines", "message"),
    [
        ([], [], "expected 1 to 4 maps, got 0"),
        ([ONE] * 5, [GOOD] * 5, "expected 1 to 4 maps, got 5"),
        (ONE[None], [GOOD], "maps must be a sequence of .* got Tensor"),
        ([ONE, ONE], [GOOD], "got 2 maps but 1 affines"),
        ([ONE], [GOOD, GOOD], "got 1 maps but 2 affines"),
        ([ONE, torch.ones(1, 4, 5)], [GOOD] * 2, r"maps\[1\] has shape \(1, 4, 5\) .* \(1, 4, 4\)"),
        ([ONE, ONE, torch.ones(2, 4, 4)], [GOOD] * 3, r"maps\[2\] has shape \(2, 4, 4\)"),
        ([torch.ones(4, 4)], [GOOD], r"maps\[0\] must be a \(B, H, W\) float tensor"),
        ([ONE, ONE.long()], [GOOD] * 2, r"maps\[1\] must be .* torch.int64"),
        ([torch.ones(1, 0, 4)], [GOOD], "empty spatial dim"),
        ([ONE], [(1.0, 0.0, 0.0)], r"affines\[0\] needs .* positive finite std"),
        ([ONE, ONE], [GOOD, (1.0, 0.0, -1.0)], r"affines\[1\] needs .* std=-1.0"),
        ([ONE], [(float("inf"), 0.0, 1.0)], r"affines\[0\] needs a finite weight"),
        ([ONE], [(1.0, float("nan"), 1.0)], r"affines\[0\] needs a finite weight and mean"),
        ([ONE], [(1.0, 0.0, float("inf"))], "positive finite std"),
        ([ONE], [(1.0, 2.0)], r"affines\[0\] must be three numbers \(weight, mean, std\)"),
        ([ONE], [(1.0, "x", 1.0)], r"affines\[0\] must be three numbers"),
    ],
)
@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_merge_bad_arguments(
    function: Callable[..., torch.Tensor],
    maps: list[torch.Tensor],
    affines: list[tuple[float, ...]],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        function(maps, affines)


@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_merge_rejects_float64() -> None:
    with pytest.raises(ValueError, match=r"maps\[1\] has dtype torch.float64"):
        normalize_merge_blur_triton([ONE, ONE.double()], [GOOD, GOOD])


@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_refuses_autograd() -> None:
    x = torch.ones(1, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        gaussian_blur_triton(x)
    with pytest.raises(RuntimeError, match="no backward"):
        normalize_merge_blur_triton([ONE, x], [GOOD, GOOD])
