"""VQ nearest codeword: reference vs brute force, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels.vq import vq_nearest, vq_nearest_reference
from kernels.vq_triton import vq_nearest_triton


def brute_force_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry, one vector at a time in float64 (first on ties)."""
    out = []
    for row in x.double():
        dist = [float(((row - c) ** 2).sum()) for c in codebook.double()]
        out.append(min(range(len(dist)), key=dist.__getitem__))
    return torch.tensor(out, dtype=torch.int64)


def chosen_gap(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(N,) float64 distance of the chosen entry minus the smallest distance (0 when exact)."""
    dist = torch.cdist(x.double(), codebook.double()) ** 2
    return dist.gather(1, idx.cpu()[:, None])[:, 0] - dist.min(1).values


def separated(gen: torch.Generator, n: int, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors near random codewords, so the nearest entry is unambiguous."""
    codebook = torch.randn(k, d, generator=gen)
    idx = torch.randint(0, k, (n,), generator=gen)
    return codebook[idx] + 0.01 * torch.randn(n, d, generator=gen), codebook


def test_reference_matches_brute_force(gen: torch.Generator) -> None:
    x, codebook = torch.randn(23, 7, generator=gen), torch.randn(9, 7, generator=gen)
    idx, quantized = vq_nearest_reference(x, codebook)
    assert torch.equal(idx, brute_force_nearest(x, codebook))
    assert torch.equal(quantized, codebook[idx])


@pytest.mark.parametrize(
    ("n", "k", "d"),
    [(1, 1, 1), (37, 16, 19), (130, 21, 64), (50, 100, 33)],  # odd N, K, D; K over 2 blocks
)
def test_triton_matches_reference(
    device: torch.device, gen: torch.Generator, n: int, k: int, d: int
) -> None:
    x, codebook = separated(gen, n, k, d)
    ref_idx, ref_q = vq_nearest_reference(x, codebook)
    idx, quantized = vq_nearest_triton(x.to(device), codebook.to(device))
    assert idx.dtype == torch.int64 and quantized.dtype == codebook.dtype
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(quantized.cpu(), ref_q)


def test_triton_random_data_picks_a_nearest_entry(
    device: torch.device, gen: torch.Generator
) -> None:
    """Random data may hold near-ties, so check the chosen distance rather than the index."""
    x, codebook = torch.randn(200, 24, generator=gen), torch.randn(70, 24, generator=gen)
    idx, quantized = vq_nearest_triton(x.to(device), codebook.to(device))
    assert chosen_gap(x, codebook, idx).max() < 1e-4
    assert torch.equal(quantized.cpu(), codebook[idx.cpu()])


def test_triton_ties_pick_the_first_entry(device: torch.device, gen: torch.Generator) -> None:
    # Small integers: every product and sum is exact, so equal entries give bit-equal distances.
    base = torch.randint(-3, 4, (40, 8), generator=gen).float()
    codebook = torch.cat([base, base, base])  # entries j, j + 40, j + 80 are equal
    idx, _ = vq_nearest_triton(base.to(device), codebook.to(device))
    assert torch.equal(idx.cpu(), torch.arange(40))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_dtypes(device: torch.device, gen: torch.Generator, dtype: torch.dtype) -> None:
    x, codebook = separated(gen, 45, 16, 40)
    x, codebook = x.to(dtype), codebook.to(dtype)
    ref_idx, ref_q = vq_nearest_reference(x, codebook)
    idx, quantized = vq_nearest_triton(x.to(device), codebook.to(device))
    assert quantized.dtype == dtype
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(quantized.cpu(), ref_q)


def test_triton_non_contiguous(device: torch.device, gen: torch.Generator) -> None:
    x, codebook = separated(gen, 33, 17, 12)
    x_t = x.t().contiguous().t()  # column-major
    code_wide = torch.zeros(17, 24)
    code_wide[:, ::2] = codebook
    code_view = code_wide.to(device)[:, ::2]  # stride 2 along D
    assert not x_t.is_contiguous() and not code_view.is_contiguous()
    idx, quantized = vq_nearest_triton(x_t.to(device), code_view)
    ref_idx, ref_q = vq_nearest_reference(x, codebook)
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(quantized.cpu(), ref_q)
    assert quantized.is_contiguous()


def test_triton_empty_input(device: torch.device) -> None:
    idx, quantized = vq_nearest_triton(
        torch.empty(0, 5, device=device), torch.ones(3, 5, device=device)
    )
    assert idx.shape == (0,) and quantized.shape == (0, 5)


def test_dispatcher_forced_triton(device: torch.device, gen: torch.Generator) -> None:
    x, codebook = separated(gen, 20, 16, 8)
    idx, _ = vq_nearest(x.to(device), codebook.to(device), backend="triton")
    assert torch.equal(idx.cpu(), vq_nearest_reference(x, codebook)[0])


@pytest.mark.parametrize(
    ("x", "codebook", "message"),
    [
        (torch.ones(4), torch.ones(3, 4), "x must have 2 dims"),
        (torch.ones(4, 5), torch.ones(3, 4), "x has dim 5"),
        (torch.ones(4, 4), torch.ones(0, 4), "non-empty"),
        (torch.ones(4, 4, dtype=torch.int32), torch.ones(3, 4), "dtype torch.int32"),
        (torch.ones(4, 4, dtype=torch.float64), torch.ones(3, 4), "float16, bfloat16 or float32"),
        ([[1.0]], torch.ones(3, 1), "torch.Tensor"),
    ],
)
@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_bad_arguments(x: object, codebook: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vq_nearest_triton(x, codebook)


@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_refuses_autograd() -> None:
    x = torch.ones(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        vq_nearest_triton(x, torch.ones(2, 3))
