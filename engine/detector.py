"""The full inference path: uint8 frames -> logical, structural and fused anomaly maps.

The build calibrates and evaluates through :class:`Detector`, and :class:`engine.Runtime` wraps
the same object, so the maps a deployed engine produces are the maps the build measured.

On CUDA the structural branch runs on its own stream, concurrently with the logical branch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from engine.calibrate import BranchStats, FusionConfig, fuse_maps, resize_to
from engine.data.transforms import ImageTransform
from engine.models.logical import LogicalModel
from engine.models.structural import StructuralModel

MapFn = Callable[[torch.Tensor], torch.Tensor]

try:
    import nvtx as _nvtx
except ImportError:
    _nvtx = None


def nvtx_range(name: str) -> AbstractContextManager:
    """An NVTX range for Nsight Systems when the ``nvtx`` package is installed, else a no-op."""
    return _nvtx.annotate(name, domain="npgmf") if _nvtx is not None else nullcontext()


@dataclass
class Maps:
    """Model-resolution maps of a batch, each (B, S, S) float32, larger = more anomalous.
    ``fused`` is None until the branch statistics are calibrated."""

    logical: torch.Tensor
    structural: torch.Tensor
    fused: torch.Tensor | None


class Detector:
    """Both branches and their fusion on one device.

    ``logical_fn`` / ``structural_fn`` map a normalised (B, 3, S, S) batch to a (B, S, S) map; by
    default they are the eager modules' ``anomaly_map``; :mod:`engine.backends` swaps in compiled
    versions. ``structural_size`` is the structural module's input side (its config's
    ``image_size``). Not thread-safe (it owns a CUDA stream and reusable state): use one per thread.
    """

    def __init__(
        self,
        logical: LogicalModel,
        structural: StructuralModel,
        fusion: FusionConfig,
        logical_stats: BranchStats | None = None,
        structural_stats: BranchStats | None = None,
        *,
        structural_size: int,
    ) -> None:
        self.logical = logical.eval()
        self.structural = structural.eval()
        self.fusion = fusion
        self.logical_stats = logical_stats
        self.structural_stats = structural_stats
        self.logical_transform = _transform(logical.config.image_size, logical.encoder)
        self.structural_transform = _transform(structural_size, structural.patch_features.backbone)
        self.logical_fn: MapFn = logical.anomaly_map
        self.structural_fn: MapFn = structural.anomaly_map
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def device(self) -> torch.device:
        return next(self.logical.decoder.parameters()).device

    @property
    def shares_input(self) -> bool:
        """Whether both branches take the same preprocessed input (one pass serves both)."""
        return self.logical_transform == self.structural_transform

    @property
    def map_size(self) -> int:
        """Side of the fused map: the logical module's input size."""
        return self.logical.config.image_size

    def to(self, device: torch.device | str) -> Detector:
        device = torch.device(device)
        self.logical.to(device)
        self.structural.to(device)
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        return self

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> Maps:
        """uint8 RGB frames (B, H, W, 3) on :attr:`device` -> :class:`Maps` at model size."""
        with nvtx_range("preprocess"):
            # The layout is given: a frame of height 3, (B, 3, W, 3), would look ambiguous.
            x_logical = self.logical_transform.batch(frames, channels_last=True)
            x_structural = (
                x_logical
                if self.shares_input
                else self.structural_transform.batch(frames, channels_last=True)
            )
        if self._side_stream is not None:
            main = torch.cuda.current_stream(self.device)
            self._side_stream.wait_stream(main)
            with torch.cuda.stream(self._side_stream), nvtx_range("structural"):
                structural = self.structural_fn(x_structural)
            with nvtx_range("logical"):
                logical = self.logical_fn(x_logical)
            main.wait_stream(self._side_stream)
            structural.record_stream(main)
        else:
            with nvtx_range("structural"):
                structural = self.structural_fn(x_structural)
            with nvtx_range("logical"):
                logical = self.logical_fn(x_logical)
        structural = resize_to(structural, (self.map_size, self.map_size))
        fused = None
        if self.logical_stats is not None and self.structural_stats is not None:
            with nvtx_range("fuse"):
                fused = fuse_maps(
                    logical, structural, self.logical_stats, self.structural_stats, self.fusion
                )
        return Maps(logical.float(), structural.float(), fused)


def _transform(size: int, backbone) -> ImageTransform:
    """The model-input transform of a backbone: its weights carry their mean/std."""
    return ImageTransform(size, backbone.weights.mean, backbone.weights.std)
