"""NPGMF logical anomaly detection module (paper §III-A): frozen encoder + fusion decoder.

Data flow for a (B, 3, S, S) input, with ResNet-101 sizes at S = 256 in brackets::

    encoder E (frozen)     layer1 (256@64) layer2 (512@32) layer3 (1024@16) layer4 (2048@8)
    OCE                    layer4 -> two 3×3 stride-2 convs -> (512@2)
    context fusion         concat(OCE, global context) -> 1×1 -> LeWin            (F@2)
    bridge                 two upsampling de-ResNet stages, OCE mirrored          (2048@8)
    per compared level n, coarse to fine (n = layer3, layer2, layer1):
        concat(h, global context, VQ_n(atrous_n(f_E at 2× the stride of n)))
        -> 1×1 to the fusion width F -> LeWin -> de-ResNet stage D_n (×2)   -> f_D^n (C_n@S/s_n)
    image head (training only)   f_D^finest -> transposed convs -> (3@S)

The global context is the category-name text embedding (computed once at build time; a
learned vector when there is none) through a trainable FC. The paper upsamples it bilinearly to
every level; a 1×1 map upsampled bilinearly is constant, so it is broadcast instead.

Where the 2×2 OCE output meets the first compared level (layer3, 16×16): the bridge's two
×2 stages bring it to the bottleneck level's grid (8×8), where the first codebook (on layer4
features) joins; the layer3 decoding stage then does the last ×2. Each codebook thus quantises
the encoder level at the resolution of the decoder state it is fused with, i.e. the level one
step coarser than the level that stage reproduces. When a size is not a power-of-two multiple
(non-square LOCO-like inputs, 64 px inputs whose OCE output is 1×1), the bridge and stage
outputs are bilinearly resized to the encoder grid they must match; for S divisible by 128 no
resize happens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.backbones import FeatureExtractor, load_backbone
from engine.models.decoder import DecodeStage
from engine.models.lewin import LeWinStage
from engine.models.logical_config import LogicalConfig, cpu_preset
from engine.models.vq import AtrousBlock, VectorQuantizer
from kernels import cosine_maps

__all__ = ["LogicalConfig", "LogicalModel", "LogicalOutput", "cpu_preset", "logical_loss"]


@dataclass
class LogicalOutput:
    """What one training forward produces.

    ``encoder``/``decoder``: per compared level, fine to coarse, (B, C_n, h_n, w_n) each.
    ``image``: (B, 3, H, W) reconstruction in the normalised input space (training head).
    ``vq_loss``: scalar, sum of the per-level VQ losses.
    """

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]
    image: torch.Tensor
    vq_loss: torch.Tensor


@dataclass
class LossTerms:
    """Scalar loss tensors; ``total`` is the weighted sum that is back-propagated."""

    total: torch.Tensor
    feature: torch.Tensor
    image: torch.Tensor
    vq: torch.Tensor


def _resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _broadcast(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) ``vector`` broadcast to ``like``'s batch and grid: (B, C, h, w), ``like``'s dtype."""
    b, _, h, w = like.shape
    return vector.to(like.dtype)[None, :, None, None].expand(b, -1, h, w)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, channels)


def _conv_norm_relu(in_ch: int, out_ch: int, stride: int = 2, kernel: int = 3) -> nn.Sequential:
    # GroupNorm(1): the OCE's last map is 1×1 at 128 px, where BatchNorm cannot train at batch 1.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        _group_norm(out_ch),
        nn.ReLU(inplace=True),
    )


def _bridge_stage(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Undo one OCE convolution: a ×2 de-ResNet stage for stride 2, a 3×3 conv for stride 1."""
    if stride == 2:
        return DecodeStage(in_ch, out_ch, norm_layer=_group_norm)
    return _conv_norm_relu(in_ch, out_ch, stride=1)


class MultiScaleFusion(nn.Module):
    """RD4AD-style bottleneck input: each finer level average-pooled to the bottleneck level's
    grid and projected (1×1) to a quarter of its width, concatenated with the bottleneck level
    and merged back to its width (1×1).

    Shapes: ``{level: (B, C_l, h_l, w_l)}`` -> (B, C_b, h_b, w_b).
    """

    def __init__(self, channels: dict[str, int], levels: tuple[str, ...], bottleneck: str) -> None:
        super().__init__()
        c_b = channels[bottleneck]
        width = max(c_b // 4, 16)
        self.levels, self.bottleneck = levels, bottleneck
        self.project = nn.ModuleDict(
            {lv: _conv_norm_relu(channels[lv], width, stride=1, kernel=1) for lv in levels}
        )
        self.merge = _conv_norm_relu(c_b + width * len(levels), c_b, stride=1, kernel=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        last = features[self.bottleneck]
        grid = (int(last.shape[-2]), int(last.shape[-1]))
        pooled = [F.adaptive_avg_pool2d(self.project[lv](features[lv]), grid) for lv in self.levels]
        return self.merge(torch.cat([last, *pooled], dim=1))


class LevelFusion(nn.Module):
    """One decoder level: concat(state, context, VQ(atrous(prior))) -> 1×1 -> LeWin -> D_n.

    Shapes: state (B, state_ch, h, w), context (B, ctx, h, w), prior (B, prior_ch, h, w) ->
    decoded (B, out_ch, 2h, 2w) and the scalar VQ loss (None without ``with_loss``).
    """

    def __init__(
        self, state_ch: int, prior_ch: int, out_ch: int, num_blocks: int, config: LogicalConfig
    ) -> None:
        super().__init__()
        c = config
        self.atrous = AtrousBlock(prior_ch, c.codebook_dim, c.atrous_dilations)
        self.vq = VectorQuantizer(c.codebook_size, c.codebook_dim, c.commitment_beta)
        self.project = nn.Conv2d(state_ch + c.context_dim + c.codebook_dim, c.fusion_width, 1)
        self.fuse = LeWinStage(
            c.fusion_width, c.lewin_depth, c.lewin_window, c.lewin_head_dim, c.lewin_mlp_ratio
        )
        self.decode = DecodeStage(c.fusion_width, out_ch, num_blocks)

    def forward(
        self,
        state: torch.Tensor,
        context: torch.Tensor,
        prior: torch.Tensor,
        with_loss: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        quantized, _, vq_loss = self.vq(self.atrous(prior), with_loss)
        fused = self.fuse(self.project(torch.cat([state, context, quantized], dim=1)))
        return self.decode(fused), vq_loss


class ImageHead(nn.Module):
    """Light head for the MSE image-reconstruction term only (training; not in the map path).

    Shapes: (B, in_ch, h, w) -> (B, 3, h * 2**num_up, w * 2**num_up).
    """

    def __init__(self, in_ch: int, num_up: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for i in range(num_up):
            out = max(width >> i, 8)
            layers += [
                nn.ConvTranspose2d(ch, out, 2, stride=2, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FusionDecoder(nn.Module):
    """Everything trainable: OCE, global context, codebooks, LeWin fusion, de-ResNet stages and
    the image head. Checkpoints hold this module's state only (the encoder is frozen).

    ``forward(features)`` maps the encoder's ``{level: (B, C, h, w)}`` to the decoder features
    ``{level: (B, C_n, h_n, w_n)}`` of the compared levels and the scalar VQ loss (None with
    ``with_loss=False``, the inference path).
    """

    def __init__(
        self,
        config: LogicalConfig,
        channels: dict[str, int],
        strides: dict[str, int],
        text_embedding: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        c = config
        missing = [lvl for lvl in (*c.compared_levels, c.bottleneck_level) if lvl not in channels]
        if missing:
            raise ValueError(f"the encoder does not provide levels {missing}")
        # Fine to coarse; each level's prior is the next coarser one, the last one's the bottleneck.
        order = sorted(range(len(c.compared_levels)), key=lambda i: strides[c.compared_levels[i]])
        self.levels = tuple(c.compared_levels[i] for i in order)
        blocks = [c.decoder_blocks[i] for i in order]
        self.priors = (*self.levels[1:], c.bottleneck_level)
        for level, prior in zip(self.levels, self.priors, strict=True):
            if strides[prior] != 2 * strides[level]:
                raise ValueError(
                    f"levels must be consecutive (stride ×2 each, bottleneck last): {level} has "
                    f"stride {strides[level]} but {prior} has {strides[prior]}"
                )
        self.bottleneck = c.bottleneck_level

        if text_embedding is None:
            self.text = nn.Parameter(torch.randn(c.learned_text_dim))
        else:
            if text_embedding.dim() != 1 or not torch.isfinite(text_embedding).all():
                raise ValueError(
                    f"text_embedding must be a finite (dim,) vector, got {tuple(text_embedding.shape)}"
                )
            self.register_buffer("text", text_embedding.detach().float().clone())
        self.context_fc = nn.Linear(self.text.numel(), c.context_dim)

        c_b = channels[self.bottleneck]
        oce_mid, oce_out = max(c_b // 2, 1), max(c_b // 4, 1)
        first, second = c.oce_strides
        self.fuse_levels = (
            MultiScaleFusion(channels, self.levels, self.bottleneck)
            if c.bottleneck_input == "fused"
            else None
        )
        self.oce = nn.Sequential(
            _conv_norm_relu(c_b, oce_mid, first), _conv_norm_relu(oce_mid, oce_out, second)
        )
        self.context_project = nn.Conv2d(oce_out + c.context_dim, c.fusion_width, 1)
        self.context_fuse = LeWinStage(
            c.fusion_width, c.lewin_depth, c.lewin_window, c.lewin_head_dim, c.lewin_mlp_ratio
        )
        # GroupNorm for the same reason as the OCE: the bridge starts from the OCE's 1×1/2×2 map.
        self.bridge = nn.Sequential(
            _bridge_stage(c.fusion_width, oce_mid, second), _bridge_stage(oce_mid, c_b, first)
        )
        self.stages = nn.ModuleDict()
        state_ch = c_b
        for level, prior, n_blocks in reversed(list(zip(self.levels, self.priors, blocks))):
            self.stages[level] = LevelFusion(
                state_ch, channels[prior], channels[level], n_blocks, c
            )
            state_ch = channels[level]
        num_up = int(math.log2(strides[self.levels[0]]))
        self.image_head = ImageHead(channels[self.levels[0]], num_up)

    def context_vector(self) -> torch.Tensor:
        """The global context, (context_dim,): the text embedding through the FC."""
        return self.context_fc(self.text)

    def forward(
        self, features: dict[str, torch.Tensor], with_loss: bool = True
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        prior = features[self.bottleneck]
        vector = self.context_vector()  # weights only: once per forward, not once per level
        oce = self.oce(prior if self.fuse_levels is None else self.fuse_levels(features))
        state = torch.cat([oce, _broadcast(vector, oce)], dim=1)
        state = _resize_to(self.bridge(self.context_fuse(self.context_project(state))), prior)
        decoded: dict[str, torch.Tensor] = {}
        vq_loss = prior.new_zeros((), dtype=torch.float32) if with_loss else None
        for level, prior_level in reversed(list(zip(self.levels, self.priors))):
            out, level_vq = self.stages[level](
                state, _broadcast(vector, state), features[prior_level], with_loss
            )
            state = decoded[level] = _resize_to(out, features[level])
            if vq_loss is not None:
                vq_loss = vq_loss + level_vq
        return decoded, vq_loss

    def quantizers(self) -> dict[str, VectorQuantizer]:
        """Each compared level's codebook, by the level its stage reproduces."""
        return {level: self.stages[level].vq for level in self.levels}

    @torch.no_grad()
    def init_codebooks(
        self, batches: Iterable[dict[str, torch.Tensor]], seed: int, max_vectors: int = 20_000
    ) -> None:
        """k-means initialisation of every codebook on the atrous output of encoder feature
        ``batches`` (``{level: (B, C, h, w)}``), run in training mode (BatchNorm on batch
        statistics, as in training); at most ``max_vectors`` rows (a seeded sample) per level."""
        was_training = self.training
        self.train()
        vectors: dict[str, list[torch.Tensor]] = {level: [] for level in self.levels}
        for features in batches:
            for level, prior in zip(self.levels, self.priors, strict=True):
                z = self.stages[level].atrous(features[prior])
                vectors[level].append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu())
        generator = torch.Generator().manual_seed(seed)
        for i, (level, quantizer) in enumerate(self.quantizers().items()):
            rows = torch.cat(vectors[level])
            if rows.shape[0] < quantizer.num_codes:
                raise ValueError(
                    f"the {level} codebook has {quantizer.num_codes} entries, but the training "
                    f"images give only {rows.shape[0]} vectors at that level to initialise it "
                    "from: use more training images or a larger logical.image_size"
                )
            if rows.shape[0] > max_vectors:
                rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_vectors]]
            quantizer.init_from_data(rows, seed=seed + i)
        self.train(was_training)

    def restart_dead_codes(self) -> dict[str, int]:
        """:meth:`VectorQuantizer.restart_dead` for every codebook; entries moved per level."""
        return {level: q.restart_dead() for level, q in self.quantizers().items()}


class LogicalModel(nn.Module):
    """Frozen encoder + multi-semantic fusion decoder (NPGMF M_LAD).

    ``forward(x)`` (training; x (B, 3, H, W) normalised) -> :class:`LogicalOutput`.
    ``anomaly_map(x)`` (inference) -> (B, H, W) float32, larger = more anomalous; it skips the
    image head and uses no data-dependent Python control flow, so it traces/exports.
    """

    def __init__(
        self,
        config: LogicalConfig,
        encoder: FeatureExtractor,
        text_embedding: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.decoder = FusionDecoder(config, encoder.channels, encoder.strides, text_embedding)
        self.levels = self.decoder.levels
        self.encoder.eval()

    @classmethod
    def build(
        cls,
        config: LogicalConfig,
        text_embedding: torch.Tensor | None = None,
        weights: str | Path = "auto",
        allow_random: bool = False,
        verbose: bool = True,
    ) -> LogicalModel:
        """Load the configured backbone (see :func:`load_backbone`) and build the model."""
        levels = (*config.compared_levels, config.bottleneck_level)
        encoder = load_backbone(config.backbone, levels, weights, allow_random, verbose)
        return cls(config, encoder, text_embedding)

    def train(self, mode: bool = True) -> LogicalModel:
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics must not move
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(x.shape)}")

    def features(
        self, x: torch.Tensor, with_loss: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Encoder and decoder features per compared level (fine to coarse) and the VQ loss
        (None without ``with_loss``)."""
        self._check_input(x)
        with torch.no_grad():
            encoded = self.encoder(x)
        decoded, vq_loss = self.decoder(encoded, with_loss)
        return [encoded[lv] for lv in self.levels], [decoded[lv] for lv in self.levels], vq_loss

    def init_codebooks(self, images: Iterable[torch.Tensor], seed: int) -> None:
        """k-means initialisation of the codebooks from batches of normalised (B, 3, H, W)
        training images (see :meth:`FusionDecoder.init_codebooks`)."""
        with torch.no_grad():
            encoded = (self.encoder(x) for x in images)
            self.decoder.init_codebooks(encoded, seed)

    def forward(self, x: torch.Tensor) -> LogicalOutput:
        encoder, decoder, vq_loss = self.features(x)
        assert vq_loss is not None
        image = _resize_to(self.decoder.image_head(decoder[0]), x)
        return LogicalOutput(encoder, decoder, image, vq_loss)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over compared levels of bilinearly upsampled (align_corners=True, as RD4AD)
        per-pixel 1 − cos(f_E^n, f_D^n): (B, 3, H, W) -> (B, H, W) float32. No VQ loss is
        computed, and under no_grad no straight-through arithmetic either."""
        encoder, decoder, _ = self.features(x, with_loss=False)
        return cosine_maps(encoder, decoder, (x.shape[-2], x.shape[-1]), align_corners=True)


def logical_loss(output: LogicalOutput, images: torch.Tensor, config: LogicalConfig) -> LossTerms:
    """Weighted sum of the cosine feature loss, the MSE image term and the VQ terms.

    Feature term per level: ``"pixel"``: mean over (B, h, w) of 1 − cos over channels;
    ``"flat"``: mean over B of 1 − cos of the flattened (C·h·w) vectors (RD4AD). Summed over
    levels. ``images`` (B, 3, H, W) is the normalised input the image head reconstructs.
    """
    feature = images.new_zeros((), dtype=torch.float32)
    for e, d in zip(output.encoder, output.decoder, strict=True):
        e, d = e.float(), d.float()
        if config.feature_loss == "pixel":
            cos = F.cosine_similarity(e, d, dim=1, eps=1e-8)
        else:
            cos = F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1, eps=1e-8)
        feature = feature + (1.0 - cos).mean()
    image = F.mse_loss(output.image.float(), images.float())
    vq = output.vq_loss.float()
    total = config.feature_weight * feature + config.image_weight * image + config.vq_weight * vq
    return LossTerms(total=total, feature=feature, image=image, vq=vq)
