"""Logical cosine maps: reference vs per-pixel loops, Triton vs reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.cosine_maps import cosine_maps, cosine_maps_reference
from kernels.cosine_maps_triton import cosine_maps_triton


def bilinear(src: np.ndarray, out_h: int, out_w: int, align_corners: bool) -> np.ndarray:
    """Bilinear resize of one (h, w) map, pixel by pixel, with F.interpolate's conventions."""
    h, w = src.shape

    def source(o: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        if align_corners:
            pos = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            pos = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(pos), n_in - 1)
        return lo, min(lo + 1, n_in - 1), pos - lo

    out = np.empty((out_h, out_w))
    for oy in range(out_h):
        y0, y1, ly = source(oy, h, out_h)
        for ox in range(out_w):
            x0, x1, lx = source(ox, w, out_w)
            top = (1 - lx) * src[y0, x0] + lx * src[y0, x1]
            bottom = (1 - lx) * src[y1, x0] + lx * src[y1, x1]
            out[oy, ox] = (1 - ly) * top + ly * bottom
    return out


def loop_cosine_maps(
    encoder: list[torch.Tensor], decoder: list[torch.Tensor], out_size: tuple[int, int], align: bool
) -> np.ndarray:
    """Per-pixel 1 − cos in float64, resized and summed over levels."""
    batch = encoder[0].shape[0]
    total = np.zeros((batch, *out_size))
    for e, d in zip(encoder, decoder):
        e, d = e.double().numpy(), d.double().numpy()
        for b in range(batch):
            level = np.empty(e.shape[2:])
            for y in range(e.shape[2]):
                for x in range(e.shape[3]):
                    u, v = e[b, :, y, x], d[b, :, y, x]
                    norms = max(np.linalg.norm(u), 1e-8) * max(np.linalg.norm(v), 1e-8)
                    level[y, x] = 1.0 - u @ v / norms
            total[b] += bilinear(level, *out_size, align)
    return total


def random_levels(
    gen: torch.Generator, batch: int, shapes: list[tuple[int, int, int]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Encoder / decoder features with decoder correlated to encoder, as after training."""
    enc = [torch.randn(batch, *s, generator=gen) for s in shapes]
    dec = [e + 0.7 * torch.randn(e.shape, generator=gen) for e in enc]
    return enc, dec


LEVELS = [(5, 6, 7), (12, 3, 4), (3, 1, 2)]  # different C and sizes, one 1-pixel-high level


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("out_size", [(13, 11), (4, 5), (1, 1)])  # up, down and to one pixel
def test_reference_matches_loops(
    gen: torch.Generator, align_corners: bool, out_size: tuple[int, int]
) -> None:
    enc, dec = random_levels(gen, 2, LEVELS)
    ref = cosine_maps_reference(enc, dec, out_size, align_corners)
    assert ref.shape == (2, *out_size) and ref.dtype == torch.float32
    np.testing.assert_allclose(
        ref.numpy(), loop_cosine_maps(enc, dec, out_size, align_corners), atol=1e-5
    )


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("out_size", [(13, 11), (4, 5), (1, 1), (32, 32)])
def test_triton_matches_reference(
    device: torch.device, gen: torch.Generator, align_corners: bool, out_size: tuple[int, int]
) -> None:
    enc, dec = random_levels(gen, 2, [(70, 6, 7), (12, 3, 4), (3, 1, 2), (16, 8, 8)])
    ref = cosine_maps_reference(enc, dec, out_size, align_corners)
    out = cosine_maps_triton(
        [e.to(device) for e in enc], [d.to(device) for d in dec], out_size, align_corners
    )
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_dtypes(device: torch.device, gen: torch.Generator, dtype: torch.dtype) -> None:
    enc, dec = random_levels(gen, 2, [(40, 5, 6), (9, 3, 3)])
    enc, dec = [e.to(dtype) for e in enc], [d.to(dtype) for d in dec]
    ref = cosine_maps_reference(enc, dec, (11, 12))  # upcasts the same half values
    out = cosine_maps_triton([e.to(device) for e in enc], [d.to(device) for d in dec], (11, 12))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_triton_non_contiguous(device: torch.device, gen: torch.Generator) -> None:
    """Channels-last, a channel- and space-strided view and a permuted view, mixed per level."""
    big = torch.randn(2, 8, 10, 12, generator=gen)
    enc = [
        torch.randn(2, 6, 5, 7, generator=gen).to(memory_format=torch.channels_last),
        big[:, ::2, 1:, ::3],  # (2, 4, 9, 4)
    ]
    dec = [enc[0].contiguous() + 0.5, torch.randn(2, 9, 4, 4, generator=gen).permute(0, 3, 1, 2)]
    assert dec[1].shape == enc[1].shape
    assert not enc[1].is_contiguous() and not dec[1].is_contiguous()
    ref = cosine_maps_reference(enc, dec, (9, 10), align_corners=False)
    out = cosine_maps_triton(
        [e.to(device) for e in enc], [d.to(device) for d in dec], (9, 10), False
    )
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_triton_zero_features_use_eps(device: torch.device) -> None:
    """An all-zero feature vector has norm clamped to eps: cos = 0, map value 1 per level."""
    enc = [torch.zeros(1, 4, 2, 2, device=device)]
    dec = [torch.ones(1, 4, 2, 2, device=device)]
    out = cosine_maps_triton(enc, dec, (3, 3))
    torch.testing.assert_close(out.cpu(), torch.ones(1, 3, 3))


def test_dispatcher_forced_triton(device: torch.device, gen: torch.Generator) -> None:
    enc, dec = random_levels(gen, 1, [(4, 3, 3)])
    out = cosine_maps(
        [e.to(device) for e in enc], [d.to(device) for d in dec], (6, 6), backend="triton"
    )
    torch.testing.assert_close(
        out.cpu(), cosine_maps_reference(enc, dec, (6, 6)), atol=1e-5, rtol=1e-5
    )


def feats(*shape: int) -> torch.Tensor:
    return torch.ones(shape)


@pytest.mark.parametrize(
    ("encoder", "decoder", "out_size", "eps", "message"),
    [
        ([], [], (4, 4), 1e-8, "non-zero number of levels"),
        ([feats(1, 2, 3, 3)], [], (4, 4), 1e-8, "same, non-zero"),
        ([feats(1, 2, 3, 3)], [feats(1, 2, 3, 4)], (4, 4), 1e-8, "shapes differ"),
        (
            [feats(1, 2, 3, 3), feats(2, 2, 3, 3)],
            [feats(1, 2, 3, 3), feats(2, 2, 3, 3)],
            (4, 4),
            1e-8,
            "batch",
        ),
        ([feats(2, 3, 3)], [feats(2, 3, 3)], (4, 4), 1e-8, "4 dims"),
        ([feats(1, 0, 3, 3)], [feats(1, 0, 3, 3)], (4, 4), 1e-8, "empty channel"),
        ([feats(1, 2, 3, 3)], [feats(1, 2, 3, 3)], (0, 4), 1e-8, "out_size"),
        ([feats(1, 2, 3, 3)], [feats(1, 2, 3, 3)], (4,), 1e-8, "out_size"),
        ([feats(1, 2, 3, 3)], [feats(1, 2, 3, 3)], (4, 4), -1.0, "eps must be >= 0"),
        ([feats(1, 2, 3, 3)], [feats(1, 2, 3, 3)], (4, 4), float("nan"), "eps must be finite"),
    ],
)
@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_bad_arguments(
    encoder: list[torch.Tensor],
    decoder: list[torch.Tensor],
    out_size: tuple[int, ...],
    eps: float,
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        cosine_maps_triton(encoder, decoder, out_size, eps=eps)


@pytest.mark.usefixtures("as_on_a_gpu_machine")
def test_triton_refuses_autograd() -> None:
    e = torch.ones(1, 2, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        cosine_maps_triton([e], [torch.ones(1, 2, 3, 3)], (4, 4))
