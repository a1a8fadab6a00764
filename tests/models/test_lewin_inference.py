"""LeWin window attention at inference: SDPA equals the hand-written formula, and the per-size
constants (relative index, shift/padding mask) are built once, kept out of the state dict, and
never filled from a trace."""

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.models import lewin
from engine.models.lewin import (
    LeWinStage,
    WindowAttention,
    attention_mask,
    effective_window,
    masked_score,
    window_partition,
    window_reverse,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# (H, W, shift): square, shifted, non-square, padded (with and without shift), smaller than the
# window on one or both sides.
MAPS = [
    (16, 16, 0),
    (16, 16, 4),
    (8, 24, 0),
    (8, 24, 4),
    (10, 13, 0),
    (10, 13, 4),
    (12, 12, 4),
    (32, 8, 4),
    (4, 20, 4),
    (5, 3, 4),
]


def reference_attention(module: WindowAttention, x: torch.Tensor, shift: int) -> torch.Tensor:
    """The hand-written attention the module used before SDPA: explicit q·kᵀ, bias added, masked
    pairs set to the dtype's most negative value, softmax, ·v."""
    b, h, w, c = x.shape
    win_h, win_w, shift_h, shift_w = effective_window(h, w, module.window, shift)
    pad_h, pad_w = -h % win_h, -w % win_w
    x = torch.nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
    windows = window_partition(x, win_h, win_w)
    n, heads = win_h * win_w, module.num_heads
    qkv = module.qkv(windows).reshape(-1, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q * module.scale) @ k.transpose(-2, -1)
    ys, xs = torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    window = module.window
    index = (ys[:, None] - ys[None, :] + window - 1) * (2 * window - 1)
    index = index + xs[:, None] - xs[None, :] + window - 1
    attn = attn + module.relative_bias[index].permute(2, 0, 1).to(attn.dtype)
    mask = attention_mask(h, w, win_h, win_w, shift_h, shift_w, x.device)
    if mask is not None:
        attn = attn.reshape(b, mask.shape[0], heads, n, n)
        attn = attn.masked_fill(mask[None, :, None], torch.finfo(attn.dtype).min)
        attn = attn.reshape(-1, heads, n, n)
    out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, c)
    out = window_reverse(module.proj(out), win_h, win_w, h + pad_h, w + pad_w)
    return torch.roll(out, shifts=(shift_h, shift_w), dims=(1, 2))[:, :h, :w]


@pytest.fixture
def attention() -> WindowAttention:
    torch.manual_seed(0)
    module = WindowAttention(dim=16, num_heads=2, window=8)
    # A non-trivial bias so relative positions matter in the comparisons.
    torch.nn.init.normal_(module.relative_bias, std=1.0)
    return module.eval()


@pytest.mark.parametrize(("h", "w", "shift"), MAPS)
@torch.no_grad()
def test_sdpa_equals_the_hand_written_attention(attention, h, w, shift):
    x = torch.randn(3, h, w, 16)
    expected = reference_attention(attention, x, shift)
    for _ in range(2):  # building the constants, then reading the kept ones
        got = attention(x, shift)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("h", "w", "shift"), [(16, 16, 4), (10, 13, 4), (5, 3, 4)])
def test_training_gradients_equal_the_hand_written_attention(attention, h, w, shift):
    x = torch.randn(2, h, w, 16, requires_grad=True)
    weights = torch.randn(2, h, w, 16)
    inputs = [x, *attention.parameters()]
    got = torch.autograd.grad((attention.train()(x, shift) * weights).sum(), inputs)
    expected = torch.autograd.grad(
        (reference_attention(attention, x, shift) * weights).sum(), inputs
    )
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max() <= 1e-4 * max(1.0, e.abs().max().item())
    relative_bias = got[1]  # it learns through SDPA's attn_mask
    assert relative_bias.abs().sum() > 0


@pytest.mark.parametrize(("h", "w", "shift"), [(16, 16, 0), (10, 13, 4)])
@torch.no_grad()
def test_the_fused_cpu_kernel_takes_the_mask(attention, h, w, shift):
    # SDPA's fused CPU kernel accepts only 2-D or 4-D masks; with any other it falls back to the
    # unfused math path (and, restricted to the fused kernel as here, fails).
    x = torch.randn(2, h, w, 16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = attention(x, shift)
    assert (got - reference_attention(attention, x, shift)).abs().max() <= 1e-5


@torch.no_grad()
def test_float64_after_double_matches_tightly(attention):
    x = torch.randn(2, 10, 13, 16)
    attention(x, 4)  # keep float32-era constants, then convert the module
    attention.double()
    x = x.double()
    assert (attention(x, 4) - reference_attention(attention, x, 4)).abs().max() <= 1e-12


def test_constants_are_built_once_per_map_size(attention, monkeypatch):
    with torch.no_grad():
        attention(torch.randn(2, 10, 13, 16), 4)

    def rebuilt(*args: object) -> None:
        raise AssertionError("window constants rebuilt for a map size already seen")

    monkeypatch.setattr(lewin, "attention_mask", rebuilt)
    monkeypatch.setattr(lewin, "relative_position_index", rebuilt)
    with torch.no_grad():
        attention(torch.randn(1, 10, 13, 16), 4)  # any batch: same constants
        with pytest.raises(AssertionError, match="rebuilt"):
            attention(torch.randn(1, 9, 13, 16), 4)  # a new size builds its own


def test_state_dict_does_not_change_with_the_sizes_seen():
    torch.manual_seed(0)
    stage = LeWinStage(dim=16, depth=2, window=4, head_dim=8)
    keys = list(stage.state_dict())
    with torch.no_grad():
        for h, w in [(10, 6), (8, 8), (3, 5)]:
            stage(torch.randn(1, 16, h, w))
    assert list(stage.state_dict()) == keys
    assert list(stage.buffers()) == []  # nor the buffers that exported-graph cache keys hash
    LeWinStage(dim=16, depth=2, window=4, head_dim=8).load_state_dict(stage.state_dict())


def test_to_rebuilds_the_constants_on_the_new_device(attention):
    x = torch.randn(1, 10, 13, 16)
    with torch.no_grad():
        attention(x, 4)
        attention.to("meta")
        out = attention(x.to("meta"), 4)
    assert out.device.type == "meta"
    kept = attention._constants.values()
    assert kept and all(c.index.is_meta and c.mask is not None and c.mask.is_meta for c in kept)


def test_constants_kept_under_inference_mode_serve_training():
    torch.manual_seed(0)
    stage = LeWinStage(dim=16, depth=2, window=4, head_dim=8)
    x = torch.randn(2, 16, 10, 6)
    with torch.inference_mode():
        stage(x)
    stage(x).square().mean().backward()  # saves the kept index and mask for backward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stage.parameters())


@torch.no_grad()
def test_padded_queries_with_every_key_masked_stay_finite(attention):
    # 12x12 padded to 16x16 and rolled by 4: in the last window, padded queries that did not
    # wrap see only padding or wrapped keys, so their whole row is masked.
    seen: list[torch.Tensor] = []
    attention.proj.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.randn(1, 12, 12, 16)
    win_h, win_w, shift_h, shift_w = effective_window(12, 12, 8, 4)
    mask = attention_mask(12, 12, win_h, win_w, shift_h, shift_w, x.device)
    assert mask.all(-1).any()  # the case exists
    attention(x, 4)
    assert torch.isfinite(seen[0]).all()


@torch.no_grad()
def test_attention_bias_is_finite_and_masks_forbidden_pairs(attention):
    x = torch.randn(2, 12, 12, 16)
    bias = attention.attention_bias(x, 4, x.dtype)  # (B * nW, heads, N, N)
    win_h, win_w, shift_h, shift_w = effective_window(12, 12, 8, 4)
    mask = attention_mask(12, 12, win_h, win_w, shift_h, shift_w, x.device)
    forbidden = mask.repeat(2, 1, 1)[:, None].expand_as(bias)
    assert torch.isfinite(bias).all()
    assert (bias[forbidden] <= -1e30).all() and (bias[~forbidden].abs() < 10).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_score_leaves_headroom_for_the_scores(dtype):
    # SDPA adds the mask to q·kᵀ: a negative score must not push a masked pair to -inf.
    score = torch.tensor(masked_score(dtype), dtype=dtype)
    assert torch.isfinite(score - torch.tensor(1000.0, dtype=dtype))
    assert score <= -1e4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_autocast_gets_a_finite_mask_in_the_query_dtype(attention, monkeypatch, dtype):
    # Under autocast the queries are 16-bit while the LayerNorm'd input stays float32; a float32
    # mask would be cast by SDPA's autocast rule, its masked entries to -inf in float16.
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen: list[tuple[torch.dtype, torch.Tensor]] = []

    def recording(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.dtype, attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(lewin.F, "scaled_dot_product_attention", recording)
    with torch.autocast("cpu", dtype=dtype):
        out = attention(torch.randn(2, 12, 12, 16), 4)
    ((query_dtype, mask),) = seen
    assert query_dtype == dtype and mask.dtype == dtype and torch.isfinite(mask).all()
    assert torch.isfinite(out).all()


def test_fake_tensor_tracing_keeps_nothing():
    torch.manual_seed(0)
    stage = LeWinStage(dim=16, depth=2, window=4, head_dim=8).eval()
    x = torch.randn(2, 16, 10, 6)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        stage(mode.from_tensor(x))
    assert all(block.attn._constants == {} for block in stage)
    with torch.no_grad():
        stage(x)  # eager use afterwards builds real constants
    assert all(block.attn._constants for block in stage)


def test_export_reads_kept_constants_and_never_fills_them():
    torch.manual_seed(0)
    stage = LeWinStage(dim=16, depth=2, window=4, head_dim=8).eval()
    x = torch.randn(2, 16, 10, 6)
    with torch.no_grad():
        traced = torch.export.export(stage, (x,))
        assert all(block.attn._constants == {} for block in stage)  # no fake tensors kept
        eager = stage(x)
        torch.testing.assert_close(traced.module()(x), eager, rtol=0, atol=1e-5)
        # Once kept (eager call above), the constants enter the graph as lifted tensors: no
        # index or mask arithmetic is left in it.
        lifted = torch.export.export(stage, (x,))
        torch.testing.assert_close(lifted.module()(x), eager, rtol=0, atol=1e-5)
    assert not any("arange" in str(n.target) for n in lifted.graph.nodes)
    assert any("arange" in str(n.target) for n in traced.graph.nodes)


def test_compile_keeps_only_real_tensors():
    torch.manual_seed(0)
    stage = LeWinStage(dim=16, depth=2, window=4, head_dim=8).eval()
    x = torch.randn(2, 16, 10, 6)
    with torch.no_grad():
        expected = stage(x)
        for block in stage:
            block.attn._constants.clear()
        got = torch.compile(stage, backend="eager", fullgraph=True)(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(stage(x), expected, rtol=0, atol=0)
    for block in stage:
        for constants in block.attn._constants.values():
            assert all(type(t) is torch.Tensor for t in constants if t is not None)


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript")),
    reason="onnxruntime/onnxscript not installed",
)
def test_onnx_export_equals_eager(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    stage = LeWinStage(dim=16, depth=2, window=4, head_dim=8).eval()
    x = torch.randn(2, 16, 10, 6)
    with torch.no_grad():
        expected = stage(x)
        program = torch.onnx.export(stage, (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "stage.onnx"))
    session = ort.InferenceSession(str(tmp_path / "stage.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(torch.from_numpy(got) - expected).max() <= 1e-5
