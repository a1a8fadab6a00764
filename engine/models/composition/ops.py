"""Building blocks of the composition branch: PCA, Ledoit-Wolf shrinkage, robust scales, which
component owns each descriptor dimension, and connected-component labelling written with plain
tensor ops (exportable, runs on any device; eager on CPU it takes scipy's labels, the same ones).
The seeded k-means is the engine's shared one (:mod:`engine.models.kmeans`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from engine.models.composition.config import CompositionConfig

__all__ = [
    "blob_shapes",
    "blob_stats",
    "descriptor_owners",
    "label_components",
    "ledoit_wolf",
    "ledoit_wolf_batched",
    "max_3x3",
    "median_mad",
    "pca_basis",
    "shrunk_precision",
]


def pca_basis(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (p,) and top-``dim`` principal directions (p, dim) of (N, p) rows, as float32.

    Directions are sorted by decreasing variance and have a fixed sign (largest loading positive),
    so the basis is reproducible.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"pca_basis needs (N, p) rows with N >= 2, got {tuple(x.shape)}")
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"pca dim must be in 1..{x.shape[1]}, got {dim}")
    rows = x.detach().float()
    mean = rows.double().mean(0)
    centred = rows - mean.float()
    # the (p, p) product in float32 (the cost), the eigen-decomposition in float64
    covariance = (centred.t() @ centred).double() / (rows.shape[0] - 1)
    _, vectors = torch.linalg.eigh(covariance)
    basis = vectors.flip(1)[:, :dim]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return mean.float(), (basis * signs).float()


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of (n, d) samples (the same estimate as scikit-learn's).

    Returns ``(mean (d,), covariance (d, d), shrinkage)``: the covariance is
    ``(1 - s) * S + s * trace(S) / d * I`` with ``S`` the maximum-likelihood (1/n) covariance
    and ``s`` in [0, 1] the Ledoit-Wolf optimal shrinkage. Computed in float64, returned float32.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"ledoit_wolf needs (n, d) samples with n >= 2, got {tuple(x.shape)}")
    mean, covariance, shrinkage = ledoit_wolf_batched(x[:, None])
    return mean[0].float(), covariance[0].float(), float(shrinkage[0])


def ledoit_wolf_batched(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ledoit_wolf` of L sets of samples at once: (n, L, d) -> mean (L, d), covariance
    (L, d, d) and shrinkage (L,), all float64 (one estimate per set, as if each were alone)."""
    if x.dim() != 3 or x.shape[0] < 2:
        raise ValueError(f"ledoit_wolf needs (n, L, d) samples with n >= 2, got {tuple(x.shape)}")
    rows = x.detach().double()
    n, _, d = rows.shape
    mean = rows.mean(0)
    centred = rows - mean
    emp = torch.einsum("nli,nlj->lij", centred, centred) / n
    mu = torch.diagonal(emp, dim1=1, dim2=2).sum(-1) / d
    squares = centred * centred
    beta_sum = torch.einsum("nli,nlj->l", squares, squares) / n
    delta_sum = (emp * emp).sum((1, 2))
    beta = (beta_sum - delta_sum) / (d * n)
    delta = (delta_sum - d * mu * mu) / d  # ||S - mu I||² / d
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(beta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny), 0.0)
    eye = torch.eye(d, dtype=rows.dtype, device=rows.device)
    covariance = (1 - shrinkage)[:, None, None] * emp + (shrinkage * mu)[:, None, None] * eye
    return mean, covariance, shrinkage


def shrunk_precision(samples: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Inverse of the Ledoit-Wolf covariance of (n, d) samples plus ``ridge`` on the diagonal,
    so dimensions constant on the training set stay invertible and bounded."""
    _, covariance, _ = ledoit_wolf(samples)
    covariance = covariance.double()
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    return torch.linalg.inv(covariance + ridge * eye).float()


def label_components(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """8-connected component labels of binary masks by max-label propagation + pointer jumping.

    Every foreground pixel starts with its own flat index; each iteration takes the largest label
    in its 3x3 neighbourhood (within the foreground) and then the label its label points at. The
    labels of a component converge to its largest flat index; ``iterations`` is fixed (no
    data-dependent loop, so the op traces and exports); about ``2 * log2(H * W)`` iterations
    label typical masks exactly, a long winding component may need more (12 label masks up to
    64 x 64 exactly, checked on a snake winding through the whole mask). Run eagerly on CPU,
    scipy's ``ndimage.label`` gives the same labels where 12 or more steps are known exact
    (sides up to 64; about a tenth of the propagation's time there); elsewhere the propagation
    stops at the first iteration that changes nothing: the update is deterministic, so every
    later one would return the same labels.

    Args:
        mask: (M, H, W) bool.
        iterations: propagation steps, >= 1.

    Returns:
        (M, H, W) int64 labels: the component's representative flat index, -1 on background.
    """
    m, h, w = mask.shape
    flat_mask = mask.reshape(m, h * w)
    index = torch.arange(h * w, device=mask.device).expand(m, h * w)
    stop_early = _plain_cpu(index)
    if stop_early and iterations >= EXACT_ITERATIONS and max(h, w) <= EXACT_SIDE:
        return _label_with_scipy(mask)
    background = torch.full_like(index, -1)
    labels = torch.where(flat_mask, index, background)
    for _ in range(iterations):
        previous = labels
        pooled = max_3x3(labels.reshape(m, h, w)).reshape(m, h * w)
        pooled = torch.where(flat_mask, pooled, background)
        # hook: a label's representative takes the largest label seen next to any of its pixels
        labels = labels.scatter_reduce(1, labels.clamp_min(0), pooled, reduce="amax")
        labels = torch.where(flat_mask, torch.maximum(labels, pooled), background)
        # jump: follow the representative's own label
        labels = torch.where(flat_mask, labels.gather(1, labels.clamp_min(0)), background)
        if stop_early and torch.equal(labels, previous):
            break
    return labels.reshape(m, h, w)


# the propagation with this many steps labels every mask with sides up to EXACT_SIDE exactly
EXACT_ITERATIONS, EXACT_SIDE = 12, 64
_SLICE_BY_SLICE = np.zeros((3, 3, 3), dtype=bool)
_SLICE_BY_SLICE[1] = True  # 8-connected within each mask, never across masks


def _label_with_scipy(mask: torch.Tensor) -> torch.Tensor:
    """:func:`label_components`' labels of a (M, H, W) bool CPU mask from ``ndimage.label``:
    each component takes its largest flat index (within its mask), background -1."""
    m, h, w = mask.shape
    components, _ = ndimage.label(mask.numpy(), structure=_SLICE_BY_SLICE)
    components = torch.from_numpy(components).reshape(-1).long()
    index = torch.arange(h * w).repeat(m)
    count = int(components.max()) if components.numel() else 0
    representative = torch.full((count + 1,), -1, dtype=torch.long)
    representative.scatter_reduce_(0, components, index, reduce="amax")
    representative[0] = -1  # component 0 is the background
    return representative[components].reshape(m, h, w)


def max_3x3(x: torch.Tensor) -> torch.Tensor:
    """(M, H, W) -> the largest value of each pixel's 3x3 neighbourhood (edges: of the pixels
    inside), in ``x``'s dtype. Two separable passes of elementwise maxima: on CPU about ten
    times faster than ``F.max_pool2d`` at the branch's sizes, with no float round trip."""
    low = torch.iinfo(x.dtype).min if not x.dtype.is_floating_point else -torch.inf
    padded = F.pad(x, (1, 1, 1, 1), value=low)
    rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def _plain_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a real CPU tensor run eagerly: there a data-dependent early stop costs
    no device sync and no compiled or exported graph sees it."""
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    return type(x) is torch.Tensor and x.device.type == "cpu" and not tracing


def blob_stats(
    mask: torch.Tensor, values: torch.Tensor, iterations: int, min_size: int, top: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blob counts, the largest blob sizes, and how much the blobs differ from one another.

    Blobs are the 8-connected components of ``mask`` (see :func:`label_components`).

    Args:
        mask: (M, H, W) bool.
        values: (M, H*W, q) a value per pixel (read only inside ``mask``).
        min_size: blobs smaller than this many pixels are neither counted nor compared.
        top: how many of the largest blob sizes to return.

    Returns:
        ``(count, sizes, spread)``: (M,) float32 number of blobs of at least ``min_size``
        pixels; (M, top) float32 largest blob sizes in pixels, largest first, 0 where there are
        fewer blobs (small blobs included); (M, q) float32 standard deviation over those blobs,
        each blob weighing one, of the blob's mean value (0 with fewer than two blobs).
    """
    m, h, w = mask.shape
    labels = label_components(mask, iterations).reshape(m, -1).clamp_min(0)
    inside = mask.reshape(m, -1, 1).float()
    sizes = torch.zeros(m, h * w, device=mask.device).scatter_add_(1, labels, inside[..., 0])
    kept = (sizes >= min_size).float()  # (M, H*W): one entry per kept blob, at its label
    count = kept.sum(1)
    sums = _blob_sums(labels, values, inside)
    means = sums / sizes.clamp_min(1.0)[..., None]
    centre = (means * kept[..., None]).sum(1) / count.clamp_min(1.0)[:, None]
    deviation = (means - centre[:, None]) ** 2 * kept[..., None]
    spread = (deviation.sum(1) / count.clamp_min(1.0)[:, None]).sqrt()
    return count, sizes.topk(top, dim=1).values, spread


def blob_shapes(
    mask: torch.Tensor, iterations: int, min_size: int, top: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob counts and the largest blobs' lengths: how many parts of a kind, and how long.

    Blobs are the 8-connected components of ``mask`` (:func:`label_components`). A blob's length
    is the full length of the ellipse with its second moments along the major axis,
    ``4 * sqrt(largest eigenvalue of its pixel-coordinate covariance)``, in units of the mask's
    longer side (a thin straight bar of length L measures 4 L / sqrt(12), about 1.15 L).

    Args:
        mask: (M, H, W) bool.
        iterations: label propagation steps (:func:`label_components`).
        min_size: blobs smaller than this many pixels are neither counted nor measured.
        top: how many of the longest blobs to return.

    Returns:
        ``(count, lengths)``: (M,) float32 number of blobs of at least ``min_size`` pixels;
        (M, top) float32 their lengths, longest first, 0 where there are fewer blobs.
    """
    m, h, w = mask.shape
    labels = label_components(mask, iterations).reshape(m, -1).clamp_min(0)
    inside = mask.reshape(m, -1).float()
    ys, xs = torch.meshgrid(
        torch.arange(h, device=mask.device, dtype=torch.float32),
        torch.arange(w, device=mask.device, dtype=torch.float32),
        indexing="ij",
    )
    ys, xs = ys.reshape(1, -1), xs.reshape(1, -1)
    # per pixel: 1, y, x, y², x², xy (inside the mask), summed per blob at its label
    moments = torch.stack([torch.ones_like(ys), ys, xs, ys * ys, xs * xs, xs * ys], -1)
    sums = _blob_sums(labels, moments.expand(m, -1, -1), inside[..., None])
    size = sums[..., 0]
    kept = size >= min_size
    n = size.clamp_min(1.0)
    my, mx = sums[..., 1] / n, sums[..., 2] / n
    vyy = sums[..., 3] / n - my * my
    vxx = sums[..., 4] / n - mx * mx
    vxy = sums[..., 5] / n - mx * my
    major = (vyy + vxx) / 2 + torch.sqrt(((vyy - vxx) / 2) ** 2 + vxy * vxy)
    length = 4.0 * major.clamp_min(0.0).sqrt() / max(h, w)
    length = torch.where(kept, length, torch.zeros_like(length))
    return kept.float().sum(1), length.topk(top, dim=1).values


def _blob_sums(labels: torch.Tensor, values: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(M, N, q) per-pixel ``values`` inside the mask (``inside``: (M, N, 1) 0/1) summed per
    blob, each sum at the blob's (M, N) label."""
    return torch.zeros_like(values).scatter_add_(
        1, labels[..., None].expand_as(values), values * inside
    )


def median_mad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and 1.4826 x median absolute deviation over dim 0, the scale floored at 1e-3 of
    the median's size (at least 1e-3): no zero scale."""
    center = x.quantile(0.5, dim=0)
    scale = 1.4826 * (x - center).abs().quantile(0.5, dim=0)
    return center, torch.maximum(scale, 1e-3 * center.abs().clamp_min(1.0))


def descriptor_owners(config: CompositionConfig) -> torch.Tensor:
    """(F, K) float32: the share of each of ``config``'s descriptor dimensions (in
    ``part_names`` order) that belongs to each component; a pair's dimension is half each of
    its two components'. Follows :meth:`CompositionModel.parts`' layouts: component-major for
    the per-component parts, cell-major (K per cell) for ``grid``."""
    k, q, cells = config.n_components, config.appearance_dim, config.grid**2
    eye = torch.eye(k)
    first, second = torch.triu_indices(k, k, offset=1)
    pairs = torch.zeros(len(first), k)
    pairs[torch.arange(len(first)), first] = 0.5
    pairs[torch.arange(len(first)), second] = 0.5
    rows = {
        "area": eye,
        "blobs": eye,
        "pairs": pairs,
        "blob_size": eye.repeat_interleave(2, dim=0),
        "appearance": eye.repeat_interleave(q, dim=0),
        "spread": eye.repeat_interleave(q, dim=0),
        "blob_spread": eye.repeat_interleave(q, dim=0),
        "grid": eye.repeat(cells, 1),
    }
    return torch.cat([rows[name] for name in config.part_names])
