"""LeWin transformer blocks (Uformer): window attention with relative position bias + LeFF.

Settings follow Uformer: window 8, shift 0 / window/2 on alternate blocks, pre-LayerNorm,
residuals, head dim 32, LeFF feed-forward with mlp ratio 4. Two generalisations Uformer lacks:

- Any map size, square or not. A side not larger than the window shrinks the window to that
  side and is not shifted (as Swin/Uformer do for small maps); a side that is not a multiple
  of the window is zero-padded for attention and cropped after, with padded keys masked so
  they never receive attention weight.
- Windows can therefore be rectangular (e.g. 4×8 on a 4×32 map); the relative position bias
  table is the one of the configured window, indexed by the relative offsets that occur.

Padding is applied to the attention input only: LeFF's depthwise convolution sees the
unpadded map, exactly as it would for a map of a window multiple.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, win_h: int, win_w: int) -> torch.Tensor:
    """Cut (B, H, W, C) into non-overlapping windows: (B * nW, win_h * win_w, C).

    H and W must be multiples of the window. Windows are ordered row-major per image.
    """
    b, h, w, c = x.shape
    if h % win_h or w % win_w:
        raise ValueError(f"map {h}x{w} is not a multiple of the window {win_h}x{win_w}")
    x = x.reshape(b, h // win_h, win_h, w // win_w, win_w, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, win_h * win_w, c)


def window_reverse(windows: torch.Tensor, win_h: int, win_w: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, win_h * win_w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // win_h, w // win_w, win_h, win_w, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def effective_window(h: int, w: int, window: int, shift: int) -> tuple[int, int, int, int]:
    """``(win_h, win_w, shift_h, shift_w)`` for an h×w map: small sides shrink and do not shift."""
    win_h, win_w = min(window, h), min(window, w)
    shift_h = shift if h > window else 0
    shift_w = shift if w > window else 0
    return win_h, win_w, shift_h, shift_w


def attention_mask(
    h: int, w: int, win_h: int, win_w: int, shift_h: int, shift_w: int, device: torch.device
) -> torch.Tensor | None:
    """Which (query, key) pairs of each window are forbidden, or None when none are.

    The map is padded to window multiples and rolled by ``-shift``, as in the attention. A key
    is forbidden if it is padding, or if it wrapped around the map edge in the roll while the
    query did not (or the reverse): such tokens are far apart in the image.

    Returns:
        (nW, N, N) bool, True = masked, with N = win_h * win_w and windows ordered as
        :func:`window_partition` orders them.
    """
    hp, wp = -(-h // win_h) * win_h, -(-w // win_w) * win_w
    if (hp, wp) == (h, w) and shift_h == 0 and shift_w == 0:
        return None
    rows = torch.roll(torch.arange(hp, device=device), -shift_h)  # source row of every position
    cols = torch.roll(torch.arange(wp, device=device), -shift_w)
    padded = (rows[:, None] >= h) | (cols[None, :] >= w)
    # Only the last window along an axis mixes wrapped and unwrapped tokens.
    wrap = (rows[:, None] < shift_h).long() * 2 + (cols[None, :] < shift_w).long()
    labels = window_partition(torch.stack([wrap, padded.long()], -1)[None], win_h, win_w)
    wrap_id, pad = labels[..., 0], labels[..., 1].bool()
    return (wrap_id[:, :, None] != wrap_id[:, None, :]) | pad[:, None, :]


def relative_position_index(
    win_h: int, win_w: int, window: int, device: torch.device
) -> torch.Tensor:
    """(N, N) rows of a ``window``-sized bias table for every (query, key) pair of a win_h×win_w
    window, with N = win_h * win_w."""
    ys, xs = torch.meshgrid(
        torch.arange(win_h, device=device), torch.arange(win_w, device=device), indexing="ij"
    )
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def masked_score(dtype: torch.dtype) -> float:
    """Additive attention bias of a forbidden (query, key) pair.

    Finite rather than -inf, so a padded query whose keys are all masked gets a uniform row
    instead of NaN (its output is cropped away); half the most negative value of ``dtype``, so
    adding a score (SDPA adds the bias to q·kᵀ) cannot overflow to -inf in 16-bit types.
    """
    return torch.finfo(dtype).min / 2


class _WindowConstants(NamedTuple):
    """What an attention call on one map size needs besides the weights.

    ``index``: (N, N) int64 rows of the relative-bias table; ``mask``: (nW, 1, N, N) bool,
    True = forbidden, or None when nothing is masked (see :func:`attention_mask`).
    """

    index: torch.Tensor
    mask: torch.Tensor | None


def _tracing(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced (compile, export, jit) rather than run eagerly."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not torch.Tensor


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows, with learned relative position bias.

    The relative index and the shift/padding mask depend only on the map size: they are built
    once per (map size, shift, device) in eager mode and kept in a plain dict, not in buffers,
    so state dicts and exported-graph cache keys do not change with the sizes seen. A trace
    (compile/export) reads that dict but never fills it: tensors made while tracing are fake.
    Attention runs through :func:`F.scaled_dot_product_attention` with the bias and the mask
    combined into one float ``attn_mask``.

    Shapes: (B, H, W, C) -> (B, H, W, C).
    """

    def __init__(self, dim: int, num_heads: int, window: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.num_heads, self.window = num_heads, window
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_bias, std=0.02)
        self._constants: dict[tuple[int, int, int, torch.device], _WindowConstants] = {}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # .to()/.cuda()/.half(): the kept constants are rebuilt on the next call, on the new device.
        self._constants.clear()
        return super()._apply(fn, recurse)

    def _window_constants(self, x: torch.Tensor, shift: int) -> _WindowConstants:
        """The :class:`_WindowConstants` of ``x``'s (B, H, W, C) map size and ``shift``."""
        h, w = int(x.shape[1]), int(x.shape[2])
        key = (h, w, shift, x.device)
        kept = self._constants.get(key)
        if kept is not None:
            return kept
        if _tracing(x):
            return self._build_constants(h, w, shift, x.device)
        # Normal tensors even under inference_mode: training may later save them for backward.
        with torch.inference_mode(False):
            constants = self._constants[key] = self._build_constants(h, w, shift, x.device)
        return constants

    def _build_constants(
        self, h: int, w: int, shift: int, device: torch.device
    ) -> _WindowConstants:
        win_h, win_w, shift_h, shift_w = effective_window(h, w, self.window, shift)
        mask = attention_mask(h, w, win_h, win_w, shift_h, shift_w, device)
        return _WindowConstants(
            relative_position_index(win_h, win_w, self.window, device),
            None if mask is None else mask[:, None],
        )

    def attention_bias(self, x: torch.Tensor, shift: int, dtype: torch.dtype) -> torch.Tensor:
        """SDPA's float ``attn_mask`` for ``x`` (B, H, W, C), in ``dtype`` (the query's, which
        autocast may make narrower than ``x``'s): the relative position bias, with
        :func:`masked_score` on forbidden pairs. (1, heads, N, N) when nothing is masked, else
        (B * nW, heads, N, N), windows ordered as :func:`window_partition` orders them (4-D
        either way: SDPA's fused CPU kernel takes no 3-D mask)."""
        index, mask = self._window_constants(x, shift)
        bias = self.relative_bias[index].to(dtype).permute(2, 0, 1)
        if mask is None:
            return bias[None]
        bias = bias.masked_fill(mask, masked_score(dtype))  # (nW, heads, N, N)
        return bias.expand(x.shape[0], *bias.shape).reshape(-1, *bias.shape[1:])

    def forward(self, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
        _, h, w, c = x.shape
        win_h, win_w, shift_h, shift_w = effective_window(h, w, self.window, shift)
        pad_h, pad_w = -h % win_h, -w % win_w
        padded = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        if shift_h or shift_w:
            padded = torch.roll(padded, shifts=(-shift_h, -shift_w), dims=(1, 2))
        windows = window_partition(padded, win_h, win_w)  # (B*nW, N, C)
        n = win_h * win_w
        qkv = self.qkv(windows).reshape(-1, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B*nW, heads, N, head_dim)
        attn_mask = self.attention_bias(x, shift, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(-1, n, c))
        out = window_reverse(out, win_h, win_w, h + pad_h, w + pad_w)
        if shift_h or shift_w:
            out = torch.roll(out, shifts=(shift_h, shift_w), dims=(1, 2))
        return out[:, :h, :w]


class LeFF(nn.Module):
    """Locally-enhanced feed-forward: Linear -> GELU -> depthwise 3×3 -> GELU -> Linear.

    Shapes: (B, H, W, C) -> (B, H, W, C).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        x = F.gelu(self.dwconv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return self.fc2(x)


class LeWinBlock(nn.Module):
    """Pre-LN residual block: ``x + WMSA(LN(x))``, then ``x + LeFF(LN(x))``.

    Shapes: (B, C, H, W) -> (B, C, H, W) (channels-first, to sit between convolutions).
    """

    def __init__(
        self, dim: int, num_heads: int, window: int = 8, shift: int = 0, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, window={window}), got {shift}")
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = LeFF(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x), self.shift)
        x = x + self.ffn(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class LeWinStage(nn.Sequential):
    """``depth`` LeWin blocks alternating shift 0 and window/2. Shapes: (B, C, H, W) -> same."""

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        window: int = 8,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        heads = max(dim // head_dim, 1)
        super().__init__(
            *[
                LeWinBlock(dim, heads, window, shift=(i % 2) * (window // 2), mlp_ratio=mlp_ratio)
                for i in range(depth)
            ]
        )
