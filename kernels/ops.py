"""The Triton kernels as opaque PyTorch operators, ``torch.ops.npgmf.*``.

``torch.compile`` and ``torch.export`` see each kernel as one node whose output shapes come from
its fake implementation, instead of tracing the Triton launches: Inductor treated those
launches as input mutations and skipped CUDA graphs. The ops mutate nothing, and their outputs
never alias their inputs. Only the dispatchers' Triton path calls them; the PyTorch references
stay plain ATen, which the ONNX export needs.

A leaf module: registering the ops needs no Triton. Each implementation imports its
``*_triton`` module on first call, so on CPU ``TRITON_INTERPRET=1`` must be set before that,
as for the kernels themselves. The fakes check only what decides the output shapes; the
implementations check the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@torch.library.custom_op("npgmf::vq_nearest", mutates_args=())
def vq_nearest_op(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`kernels.vq_triton.vq_nearest_triton`: (N, D), (K, D) -> (N,) int64, (N, D)."""
    from kernels.vq_triton import vq_nearest_triton

    return vq_nearest_triton(x, codebook)


@vq_nearest_op.register_fake
def _vq_nearest_fake(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    _require(
        x.dim() == 2 and codebook.dim() == 2 and x.shape[1] == codebook.shape[1],
        f"vq_nearest expects (N, D) and (K, D), got {tuple(x.shape)} and {tuple(codebook.shape)}",
    )
    n, d = x.shape
    return x.new_empty(n, dtype=torch.int64), codebook.new_empty((n, d))


@torch.library.custom_op("npgmf::knn_min", mutates_args=())
def knn_min_op(queries: Tensor, bank: Tensor, bank_sq: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`kernels.knn_triton.knn_min_triton`: (Q, D), (M, D), (M,)? -> (Q,) f32, (Q,) i64."""
    from kernels.knn_triton import knn_min_triton

    return knn_min_triton(queries, bank, bank_sq=bank_sq)


@knn_min_op.register_fake
def _knn_min_fake(queries: Tensor, bank: Tensor, bank_sq: Tensor | None) -> tuple[Tensor, Tensor]:
    _require(
        queries.dim() == 2 and bank.dim() == 2 and queries.shape[1] == bank.shape[1],
        f"knn_min expects (Q, D) and (M, D), got {tuple(queries.shape)} and {tuple(bank.shape)}",
    )
    n_q = queries.shape[0]
    return (
        queries.new_empty(n_q, dtype=torch.float32),
        queries.new_empty(n_q, dtype=torch.int64),
    )


@torch.library.custom_op("npgmf::cosine_maps", mutates_args=())
def cosine_maps_op(
    encoder: Sequence[Tensor],
    decoder: Sequence[Tensor],
    out_size: Sequence[int],
    align_corners: bool,
    eps: float,
) -> Tensor:
    """:func:`kernels.cosine_maps_triton.cosine_maps_triton`: levels -> (B, H, W) float32."""
    from kernels.cosine_maps_triton import cosine_maps_triton

    return cosine_maps_triton(encoder, decoder, tuple(out_size), align_corners, eps)


@cosine_maps_op.register_fake
def _cosine_maps_fake(
    encoder: Sequence[Tensor],
    decoder: Sequence[Tensor],
    out_size: Sequence[int],
    align_corners: bool,
    eps: float,
) -> Tensor:
    _require(
        len(encoder) == len(decoder) and len(encoder) > 0 and encoder[0].dim() == 4,
        "cosine_maps expects the same, non-zero number of (B, C, h, w) encoder and decoder levels",
    )
    _require(len(out_size) == 2, f"out_size must be (H, W), got {list(out_size)}")
    return encoder[0].new_empty((encoder[0].shape[0], *out_size), dtype=torch.float32)


@torch.library.custom_op("npgmf::gaussian_blur", mutates_args=())
def gaussian_blur_op(x: Tensor, sigma: float, truncate: float) -> Tensor:
    """:func:`kernels.blur_triton.gaussian_blur_triton`: (B, H, W) -> (B, H, W) float32."""
    from kernels.blur_triton import gaussian_blur_triton

    return gaussian_blur_triton(x, sigma, truncate)


@gaussian_blur_op.register_fake
def _gaussian_blur_fake(x: Tensor, sigma: float, truncate: float) -> Tensor:
    _require(x.dim() == 3, f"gaussian_blur expects (B, H, W) maps, got {tuple(x.shape)}")
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("npgmf::normalize_merge_blur", mutates_args=())
def normalize_merge_blur_op(
    maps: Sequence[Tensor],
    weights: Sequence[float],
    means: Sequence[float],
    stds: Sequence[float],
    sigma: float,
) -> Tensor:
    """:func:`kernels.blur_triton.normalize_merge_blur_triton`, one affine per map split into
    ``weights``, ``means`` and ``stds``: 1 to 4 (B, H, W) maps -> (B, H, W) float32."""
    from kernels.blur_triton import normalize_merge_blur_triton

    _require(
        len(weights) == len(means) == len(stds),
        f"normalize_merge_blur got {len(weights)} weights, {len(means)} means, {len(stds)} stds",
    )
    affines = list(zip(weights, means, stds, strict=True))
    return normalize_merge_blur_triton(maps, affines, sigma)


@normalize_merge_blur_op.register_fake
def _normalize_merge_blur_fake(
    maps: Sequence[Tensor],
    weights: Sequence[float],
    means: Sequence[float],
    stds: Sequence[float],
    sigma: float,
) -> Tensor:
    _require(
        len(maps) > 0 and maps[0].dim() == 3,
        "normalize_merge_blur expects 1 to 4 (B, H, W) maps",
    )
    return maps[0].new_empty(maps[0].shape, dtype=torch.float32)
