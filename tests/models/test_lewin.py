import pytest
import torch

from engine.models.lewin import (
    LeWinBlock,
    LeWinStage,
    WindowAttention,
    attention_mask,
    effective_window,
    window_partition,
    window_reverse,
)


@pytest.fixture
def attention() -> WindowAttention:
    torch.manual_seed(0)
    module = WindowAttention(dim=8, num_heads=2, window=8)
    # A non-trivial bias so relative positions matter in the comparisons below.
    torch.nn.init.normal_(module.relative_bias, std=1.0)
    return module.eval()


@pytest.mark.parametrize(("h", "w", "wh", "ww"), [(16, 16, 8, 8), (8, 24, 8, 8), (4, 12, 4, 3)])
def test_window_partition_round_trip(h, w, wh, ww):
    x = torch.randn(2, h, w, 3)
    windows = window_partition(x, wh, ww)
    assert windows.shape == (2 * (h // wh) * (w // ww), wh * ww, 3)
    # First window is the top-left block, row-major.
    assert torch.equal(windows[0], x[0, :wh, :ww].reshape(-1, 3))
    assert torch.equal(window_reverse(windows, wh, ww, h, w), x)


def test_window_partition_rejects_non_multiples():
    with pytest.raises(ValueError, match="multiple"):
        window_partition(torch.randn(1, 10, 8, 2), 8, 8)


def test_effective_window_shrinks_small_sides_and_drops_their_shift():
    assert effective_window(16, 16, 8, 4) == (8, 8, 4, 4)
    assert effective_window(5, 3, 8, 4) == (5, 3, 0, 0)
    assert effective_window(4, 20, 8, 4) == (4, 8, 0, 4)


def test_no_mask_when_nothing_is_shifted_or_padded():
    assert attention_mask(16, 8, 8, 8, 0, 0, torch.device("cpu")) is None


def test_shift_mask_separates_wrapped_tokens():
    mask = attention_mask(16, 16, 8, 8, 4, 4, torch.device("cpu"))
    assert mask.shape == (4, 64, 64)
    assert not mask[0].any()  # the top-left window holds no wrapped token
    # Last window (rolled rows/cols 8..15): four groups of 16 tokens (wrapped in h, w, both, none).
    allowed = (~mask[3]).sum(1)
    assert torch.equal(allowed, torch.full((64,), 16))


def _rows(x: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    return x[:, r0:r1, c0:c1]


@torch.no_grad()
def test_shifted_attention_never_crosses_the_wrap_boundary(attention):
    x = torch.randn(2, 16, 16, 8)
    out = attention(x, shift=4)
    # Source rows 0..3 wrap to the bottom window together with rows 12..15; each group must
    # attend only within itself, i.e. behave as if it were a map of its own.
    for r0, r1, c0, c1 in [(0, 4, 4, 12), (12, 16, 4, 12), (0, 4, 0, 4), (12, 16, 12, 16)]:
        alone = attention(_rows(x, r0, r1, c0, c1), shift=0)
        assert torch.allclose(_rows(out, r0, r1, c0, c1), alone, atol=1e-5)


@torch.no_grad()
def test_padding_does_not_leak_into_attention(attention):
    x = torch.randn(1, 10, 10, 8)
    out = attention(x, shift=0)  # padded to 16x16
    for r0, r1, c0, c1 in [(0, 8, 8, 10), (8, 10, 8, 10), (8, 10, 0, 8), (0, 8, 0, 8)]:
        alone = attention(_rows(x, r0, r1, c0, c1), shift=0)
        assert torch.allclose(_rows(out, r0, r1, c0, c1), alone, atol=1e-5)


@torch.no_grad()
def test_padding_and_shift_together(attention):
    x = torch.randn(1, 12, 12, 8)  # padded to 16x16, then rolled by 4
    out = attention(x, shift=4)
    assert torch.isfinite(out).all()
    # Source rows/cols 0..3 wrap into the last window next to padding: alone among themselves.
    assert torch.allclose(out[:, :4, :4], attention(x[:, :4, :4], shift=0), atol=1e-5)
    assert torch.allclose(out[:, 4:12, 4:12], attention(x[:, 4:12, 4:12], shift=0), atol=1e-5)


@torch.no_grad()
def test_non_square_windows_are_independent(attention):
    x = torch.randn(1, 8, 24, 8)
    out = attention(x, shift=0)
    assert torch.allclose(out[:, :, 8:16], attention(x[:, :, 8:16], shift=0), atol=1e-5)


def test_lewin_block_impulse_respects_shifted_windows():
    torch.manual_seed(0)
    block = LeWinBlock(dim=8, num_heads=2, window=8, shift=4)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x)[0, :, 0, 0].sum(), x)
    influence = grad.abs().sum(1)[0]  # (16, 16)
    # Output (0, 0) sees source rows/cols 0..3 only (its wrap group), plus itself via residuals.
    assert influence[:4, :4].min() > 0
    assert influence[4:].abs().max() == 0 and influence[:, 4:].abs().max() == 0


def test_unshifted_block_stays_inside_its_window():
    torch.manual_seed(0)
    block = LeWinBlock(dim=8, num_heads=2, window=8, shift=0)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x)[0, :, 0, 0].sum(), x)
    influence = grad.abs().sum(1)[0]
    assert influence[:8, :8].min() > 0
    assert influence[8:].max() == 0 and influence[:, 8:].max() == 0


def test_map_smaller_than_window_is_global_and_unshifted():
    torch.manual_seed(0)
    shifted = LeWinBlock(dim=8, num_heads=2, window=8, shift=4)
    plain = LeWinBlock(dim=8, num_heads=2, window=8, shift=0)
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(2, 8, 5, 3, requires_grad=True)
    out = shifted(x)
    assert out.shape == x.shape
    assert torch.allclose(out, plain(x), atol=1e-6)
    (grad,) = torch.autograd.grad(out[0, :, 4, 2].sum(), x)
    assert grad[0].abs().sum(0).min() > 0  # every token is attended


@pytest.mark.parametrize(("h", "w"), [(16, 16), (10, 13), (8, 24), (6, 20), (3, 5), (32, 8)])
def test_stage_shapes_and_gradients(h, w):
    torch.manual_seed(0)
    stage = LeWinStage(dim=64, depth=2, window=8, head_dim=32)
    assert [b.shift for b in stage] == [0, 4]
    assert stage[0].attn.num_heads == 2
    x = torch.randn(2, 64, h, w)
    out = stage(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in stage.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        WindowAttention(dim=10, num_heads=3)
    with pytest.raises(ValueError, match="shift"):
        LeWinBlock(dim=8, num_heads=2, window=8, shift=8)
    with pytest.raises(ValueError, match="depth"):
        LeWinStage(dim=8, depth=0)
    with pytest.raises(ValueError, match="window"):
        WindowAttention(dim=8, num_heads=2, window=0)
