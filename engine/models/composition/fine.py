"""Parts at stride 4 (``CompositionConfig.fine_parts``): how many parts of each kind, how long.

The composition branch's components live on the memory bank's 8-px patch grid, where parts a
few pixels apart merge into one blob (two pushpins in one compartment, two touching nuts), so
blob counts and sizes are unreliable there (docs/ACCURACY.md ablations 8 and 19). This module
draws the same components at the backbone's ``layer1`` stride (4 px):

1. a linear head maps ``layer1`` and ``layer2`` features, each standardised per channel, to K
   component logits on the ``layer1`` grid; it is fitted by ridge regression to the coarse
   components' soft weights, upsampled (the k-means components are the pseudo-labels, and the
   finer features draw their borders);
2. per component, the 8-connected blobs of its argmax mask: their count and the ``top``
   largest major-axis lengths (:func:`engine.models.composition.ops.blob_shapes`);
3. the descriptor's Mahalanobis distance to the training images' descriptors (median/MAD
   standardisation, Ledoit-Wolf covariance with a variance floor), ``sqrt(d² / F)``.

Everything inference needs is a buffer; ``forward`` has no data-dependent control flow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.composition.ops import blob_shapes, shrunk_precision

__all__ = ["FineParts", "RidgeFit", "fit_fine_parts"]

Fine = tuple[torch.Tensor, torch.Tensor]
Extract = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int], Fine | None]]

TOP_LENGTHS = 4
SAMPLES_PER_IMAGE = 1500
RIDGE = 1.0


class RidgeFit:
    """Ridge regression of targets on features, accumulated over batches of samples.

    Keeps only sums (memory independent of the number of samples). :meth:`solve` standardises
    the features per channel, solves ``(ZᵀZ + ridge I) W = ZᵀY`` on the centred problem (the
    intercept is the targets' mean, not penalised) and returns the map in the raw feature units.
    """

    def __init__(self, dim: int, targets: int) -> None:
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)
        self.cross = torch.zeros(dim, targets, dtype=torch.float64)
        self.target_sum = torch.zeros(targets, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """(n, dim) features and (n, targets) targets of n more samples."""
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.gram += x.t() @ x
        self.cross += x.t() @ y
        self.target_sum += y.sum(0)

    def solve(self, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (dim, targets), bias (targets,))``, float32: ``y ≈ x @ weight + bias``."""
        if self.n < 2:
            raise ValueError(f"ridge regression needs at least 2 samples, got {self.n}")
        mean = self.sum / self.n
        target_mean = self.target_sum / self.n
        cov = self.gram / self.n - torch.outer(mean, mean)
        cross = self.cross / self.n - torch.outer(mean, target_mean)
        std = cov.diagonal().clamp_min(0.0).sqrt().clamp_min(1e-6)
        eye = torch.eye(len(mean), dtype=cov.dtype)
        z_weight = torch.linalg.solve(
            self.n * cov / torch.outer(std, std) + ridge * eye, self.n * cross / std[:, None]
        )
        weight = z_weight / std[:, None]
        return weight.float(), (target_mean - mean @ weight).float()


class FineParts(nn.Module):
    """(layer1 (B, C1, H, W), layer2 (B, C2, H', W')) features -> fine-parts distance (B,).

    Args:
        channels: (C1, C2), the two levels' channel counts.
        n_components: K, the composition branch's components.
        min_blob: blobs smaller than this many ``layer1`` cells are neither counted nor measured.
        variance_floor: added to the diagonal of the standardised descriptor covariance.

    :meth:`logits` gives (B, K, H, W) component logits; :meth:`describe` the (B, K * (1 +
    ``TOP_LENGTHS``)) descriptor (per component: blob count, then its longest blobs' lengths in
    units of the grid's longer side); ``forward`` the distance, about 1 on typical good images.
    """

    def __init__(
        self,
        channels: tuple[int, int],
        n_components: int,
        min_blob: int = 2,
        variance_floor: float = 0.1,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        k = n_components
        width = k * (1 + TOP_LENGTHS)
        self.n_components = k
        self.min_blob = min_blob
        self.variance_floor = variance_floor
        self.register_buffer("weight1", torch.zeros(k, c1, 1, 1))
        self.register_buffer("weight2", torch.zeros(k, c2, 1, 1))
        self.register_buffer("bias", torch.zeros(k))
        self.register_buffer("descriptor_center", torch.zeros(width))
        self.register_buffer("descriptor_scale", torch.ones(width))
        self.register_buffer("standardised_mean", torch.zeros(width))
        self.register_buffer("precision", torch.eye(width))

    def logits(self, layer1: torch.Tensor, layer2: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) component logits on the ``layer1`` grid. The ``layer2`` term is mapped
        first and upsampled after: a linear map commutes with bilinear interpolation."""
        coarse = F.conv2d(layer2.float(), self.weight2)
        coarse = F.interpolate(coarse, size=layer1.shape[-2:], mode="bilinear", align_corners=False)
        return F.conv2d(layer1.float(), self.weight1, self.bias) + coarse

    def describe(self, layer1: torch.Tensor, layer2: torch.Tensor) -> torch.Tensor:
        """(B, K * (1 + TOP_LENGTHS)) per component: blob count, longest blob lengths."""
        labels = self.logits(layer1, layer2).argmax(1)
        b, h, w = labels.shape
        k = self.n_components
        masks = F.one_hot(labels, k).permute(0, 3, 1, 2).reshape(b * k, h, w) > 0
        count, lengths = blob_shapes(masks, _label_iterations(h, w), self.min_blob, TOP_LENGTHS)
        return torch.cat([count[:, None], lengths], 1).reshape(b, -1)

    def forward(self, layer1: torch.Tensor, layer2: torch.Tensor) -> torch.Tensor:
        u = (self.describe(layer1, layer2) - self.descriptor_center) / self.descriptor_scale
        u = u - self.standardised_mean
        d2 = torch.einsum("bi,ij,bj->b", u, self.precision, u)
        return (d2.clamp_min(0.0) / u.shape[1]).sqrt()

    @torch.no_grad()
    def fit_head(self, ridge: RidgeFit) -> None:
        """Set the head from a :class:`RidgeFit` of ``[layer1, upsampled layer2]`` features
        (in that channel order) on the components' soft weights."""
        weight, bias = ridge.solve()
        c1 = self.weight1.shape[1]
        self.weight1.copy_(weight[:c1].t()[..., None, None])
        self.weight2.copy_(weight[c1:].t()[..., None, None])
        self.bias.copy_(bias)

    @torch.no_grad()
    def fit_descriptor(self, descriptors: torch.Tensor) -> None:
        """Standardisation and precision from the (N, F) descriptors of the training images:
        per dimension the median and the larger of 1.4826 x MAD and the std (floored at a tenth
        of the varying dimensions' median scale, so constant dimensions stay finite), then the
        Ledoit-Wolf covariance of the standardised descriptors plus ``variance_floor``."""
        x = descriptors.double()
        center = x.median(0).values
        mad = 1.4826 * (x - center).abs().median(0).values
        scale = torch.maximum(mad, x.std(0, correction=0))
        varying = scale[scale > 1e-6]
        # With few training images most dimensions may never vary: they borrow the typical
        # scale of the others (else 1), or the smallest change would score without bound.
        scale = scale.clamp_min(0.1 * (float(varying.median()) if varying.numel() else 1.0))
        u = (x - center) / scale
        self.descriptor_center.copy_(center)
        self.descriptor_scale.copy_(scale)
        self.standardised_mean.copy_(u.mean(0))
        self.precision.copy_(shrunk_precision(u, self.variance_floor))


@torch.no_grad()
def fit_fine_parts(
    model: nn.Module, extract: Extract, images: Callable[[], Iterable[torch.Tensor]], seed: int
) -> None:
    """Fit ``model.fine`` (a :class:`~engine.models.composition.CompositionModel` whose coarse
    part is fitted) on the training images: one pass for the head's ridge regression on the
    coarse components' soft weights, one for the training descriptors.

    Args:
        model: the composition model.
        extract: normalised images -> (patch features, grid, raw fine levels), as
            :meth:`engine.detector.StructuralSide.composition_features`.
        images: yields the batches of normalised training images, anew at each call.
        seed: picks the pixels sampled for the regression.
    """
    fine = model.fine
    generator = torch.Generator().manual_seed(seed)
    ridge = None
    for x in images():
        features, grid, levels = extract(x)
        _, _, weights = model.assign(features.float())
        maps = weights.transpose(1, 2).reshape(weights.shape[0], -1, *grid)
        samples, targets = fine_inputs(*levels, maps, generator)
        ridge = ridge or RidgeFit(samples.shape[1], targets.shape[1])
        ridge.add(samples, targets)
    if ridge is None:
        raise ValueError("no training images to fit the fine parts on")
    fine.fit_head(ridge)
    fine.fit_descriptor(torch.cat([fine.describe(*extract(x)[2]).cpu() for x in images()]))


def fine_inputs(
    layer1: torch.Tensor, layer2: torch.Tensor, weights: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge samples of one batch: ``SAMPLES_PER_IMAGE`` random ``layer1`` cells per image,
    their ``[layer1, upsampled layer2]`` features (n, C1 + C2) and, as targets, the coarse
    components' soft weights (B, K, h, w) upsampled to the same cells (n, K)."""
    size = layer1.shape[-2:]
    up = F.interpolate(layer2.float(), size=size, mode="bilinear", align_corners=False)
    target = F.interpolate(weights.float(), size=size, mode="bilinear", align_corners=False)
    features = torch.cat([layer1.float(), up], 1).flatten(2).transpose(1, 2)
    target = target.flatten(2).transpose(1, 2)
    picks = [
        torch.randperm(features.shape[1], generator=generator)[:SAMPLES_PER_IMAGE]
        for _ in range(features.shape[0])
    ]
    rows = torch.stack(picks).to(features.device)
    index = torch.arange(features.shape[0], device=features.device)[:, None]
    return features[index, rows].flatten(0, 1), target[index, rows].flatten(0, 1)


def _label_iterations(h: int, w: int) -> int:
    """Propagation steps that label typical masks of an h x w grid exactly: 2 log2(h w)."""
    return 2 * max(1, (h * w - 1).bit_length())
