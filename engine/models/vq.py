"""Normal multi-level codebooks (paper §III-A3): atrous context block + vector quantiser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.kmeans import kmeans
from kernels import vq_nearest


class AtrousBlock(nn.Module):
    """Multi-scale context for one encoder level before quantisation (ASPP-like).

    A 1×1 reduction to ``out_channels`` keeps the dilated convolutions cheap on wide levels
    (ResNet-101 layer4 has 2048 channels); then a 1×1 branch and one 3×3 branch per dilation
    run in parallel and a 1×1 merge fuses them. Small dilations (default 1, 2, 4) suit the
    8–32 px maps this sees at 256 px input: larger ones (ASPP's 6/12/18) would mostly read padding.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(
        self, in_channels: int, out_channels: int, dilations: tuple[int, ...] = (1, 2, 4)
    ) -> None:
        super().__init__()
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {dilations}")
        branch = max(out_channels // 2, 1)
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        branches = [_conv_bn_relu(out_channels, branch, kernel=1, dilation=1)]
        branches += [_conv_bn_relu(out_channels, branch, kernel=3, dilation=d) for d in dilations]
        self.branches = nn.ModuleList(branches)
        # No ReLU after the merge: the quantiser sees zero-centred, unit-scale features.
        self.merge = nn.Sequential(
            nn.Conv2d(branch * len(branches), out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        return self.merge(torch.cat([b(x) for b in self.branches], dim=1))


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class VectorQuantizer(nn.Module):
    """VQ-VAE quantiser with a learnable codebook and a straight-through gradient.

    Every spatial vector is replaced by its nearest codebook entry (squared L2, searched by
    :func:`kernels.vq_nearest` on detached tensors). The loss is the VQ-VAE one,
    ``||sg[z] - e||² + beta * ||z - sg[e]||²`` (means over elements).

    ``beta`` defaults to 0.25, VQ-VAE's value: the commitment term only has to stop the encoder
    output drifting away from the codebook, and a weight below 1 lets the codebook move towards
    the data faster than the data moves towards it.

    Codebook hygiene (the paper is silent on it; without it entries die and the codes that stay
    alive end up encoding position rather than content):

    - :meth:`init_from_data`: k-means over vectors gathered from several training batches
      (the caller runs the model in training mode, so BatchNorm normalises as it will in
      training). Without it, the first training batch seeds the entries (a fallback).
    - :meth:`restart_dead`: entries no vector chose since the last call are moved onto vectors
      of the latest training batch; the training loop calls it after every epoch.

    ``initialized`` is a buffer, so it survives checkpoints; usage counts and the latest batch
    are per-epoch training state and are not saved.
    """

    RECENT = 4096  # latest training vectors kept for restarts

    def __init__(self, num_codes: int = 16, dim: int = 256, beta: float = 0.25) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes} and {dim}")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(num_codes), persistent=False)
        self._recent: torch.Tensor | None = None

    @torch.no_grad()
    def init_from_data(self, vectors: torch.Tensor, seed: int = 0) -> None:
        """Set the entries to the k-means centroids of ``vectors`` (N, dim), N >= num_codes."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) vectors, got {tuple(vectors.shape)}")
        if not torch.isfinite(vectors).all():
            raise RuntimeError(
                "non-finite features reach the codebook initialisation (NaN/Inf in the training "
                "images or the model)"
            )
        centroids = kmeans(vectors, self.num_codes, iterations=25, restarts=1, seed=seed)
        self.codebook.copy_(centroids.to(self.codebook.device))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _init_from_batch(self, flat: torch.Tensor) -> None:
        picks = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        noise = 0.01 * torch.randn(self.num_codes, self.dim, device=flat.device)
        self.codebook.copy_(flat[picks].float() + noise)
        self.initialized.fill_(True)

    @torch.no_grad()
    def restart_dead(self) -> int:
        """Move the entries unused since the last call onto random recent training vectors and
        reset the usage counts; returns how many were moved (0 before any training batch)."""
        dead = self.usage == 0
        moved = int(dead.sum()) if self._recent is not None else 0
        if moved:
            assert self._recent is not None
            picks = torch.randint(0, self._recent.shape[0], (moved,), device=self._recent.device)
            self.codebook[dead] = self._recent[picks].to(self.codebook.dtype)
        self.usage.zero_()
        return moved

    def forward(
        self, z: torch.Tensor, with_loss: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Quantise a feature map.

        Args:
            z: (B, dim, H, W) features.
            with_loss: compute the VQ loss (training and validation). Without it and with
                autograd off (inference), the output is the gathered entries themselves: no loss,
                no straight-through arithmetic, no second gather.

        Returns:
            ``(quantized, indices, loss)``: (B, dim, H, W) quantised features (straight-through
            unless at inference), (B, H, W) int64 codebook indices, and the scalar VQ loss (None
            without ``with_loss``).
        """
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}, H, W) features, got {tuple(z.shape)}")
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not bool(self.initialized):
            self._init_from_batch(flat.detach())
        indices, gathered = vq_nearest(flat.detach(), self.codebook.detach())
        if self.training:
            with torch.no_grad():
                self.usage += torch.bincount(indices, minlength=self.num_codes).to(self.usage)
                self._recent = flat.detach()[-self.RECENT :].float()
        if with_loss or torch.is_grad_enabled():
            quantized, loss = self._straight_through(flat, indices, with_loss)
        else:
            # Inference: the search's gathered entries are the output; the straight-through sum
            # has the same value up to rounding and only matters for gradients.
            quantized, loss = gathered.to(flat.dtype), None
        quantized = quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return quantized, indices.reshape(b, h, w), loss

    def _straight_through(
        self, flat: torch.Tensor, indices: torch.Tensor, with_loss: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, dim) straight-through quantised rows of ``flat`` (N, dim) and, ``with_loss``, the
        scalar VQ loss; gradients reach both ``flat`` and the codebook."""
        # Gather again with gradient so the codebook term reaches the entries.
        codes = F.embedding(indices, self.codebook).to(flat.dtype)
        loss = None
        if with_loss:
            loss = F.mse_loss(codes, flat.detach()) + self.beta * F.mse_loss(flat, codes.detach())
        return flat + (codes - flat).detach(), loss
