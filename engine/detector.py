"""The full inference path: uint8 frames -> branch maps (logical, structural and, when enabled,
positional and composition) and the fused anomaly map.

The build calibrates and evaluates through :class:`Detector`, and :class:`engine.Runtime` wraps
the same object, so the maps a deployed engine produces are the maps the build measured.

On CUDA the structural stream (memory bank, positional memory and composition, which share one
backbone pass unless the composition branch has an input size of its own) runs on its own CUDA
stream, concurrently with the logical branch. On CPU a backend whose logical branch runs outside
PyTorch's thread pool (``onnx``) can have it run on a worker thread, concurrently with the
structural stream (:meth:`Detector.overlap_logical`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from engine.calibrate import (
    ABSENCE,
    BRANCHES,
    PLACEMENT,
    BranchStats,
    FusionConfig,
    resize_to,
)
from engine.data.transforms import ImageTransform
from engine.models.composition import CompositionModel
from engine.models.folding import fold_batchnorm
from engine.models.fusion import Fusion
from engine.models.logical import LogicalModel
from engine.models.positional import PositionalModel
from engine.models.structural import StructuralModel, resize_input
from engine.stage_timer import StageTimer

# Runtime precisions: the networks run under autocast in the dtype, the kNN searches the bank in
# it; preprocessing, fusion and everything after stay float32.
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_precision(precision: str) -> torch.dtype | None:
    """The network dtype of ``precision`` (None: float32); ValueError for an unknown name."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {tuple(PRECISIONS)}")
    return PRECISIONS[precision]


MapFn = Callable[[torch.Tensor], torch.Tensor]
StructuralFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
# (x, fine) -> (patch features, grid, the raw fine levels when ``fine`` else None)
Fine = tuple[torch.Tensor, torch.Tensor]
FeaturesFn = Callable[[torch.Tensor, bool], tuple[torch.Tensor, tuple[int, int], Fine | None]]

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

    ``positional`` and ``composition`` are None when that branch is off; ``fused`` is None until
    the branch statistics are calibrated. ``placement`` (with the composition branch): where
    the composition model's distance lies, 1 at its most anomalous component's pixels
    (:meth:`engine.models.composition.CompositionModel.forward`); fusion may place the branch's
    evidence there (``FusionConfig.placement_power``). ``absence`` (with
    ``CompositionConfig.absence_sigma``): where a part is missing, in the units of its
    validation image scores (:mod:`engine.models.composition.absence`); fusion may mark it
    (``FusionConfig.absence_weight``). Neither is a branch map.
    """

    logical: torch.Tensor
    structural: torch.Tensor
    fused: torch.Tensor | None = None
    composition: torch.Tensor | None = None
    positional: torch.Tensor | None = None
    placement: torch.Tensor | None = None
    absence: torch.Tensor | None = None

    def branches(self) -> dict[str, torch.Tensor]:
        """The branch maps present, by branch name (:data:`engine.calibrate.BRANCHES` order)."""
        maps = {name: getattr(self, name) for name in BRANCHES}
        return {name: m for name, m in maps.items() if m is not None}

    def fusion_inputs(self) -> dict[str, torch.Tensor]:
        """What :class:`~engine.models.fusion.Fusion` takes: :meth:`branches` and, when
        present, the placement and absence maps under :data:`engine.calibrate.PLACEMENT` and
        :data:`engine.calibrate.ABSENCE`."""
        extra = {PLACEMENT: self.placement, ABSENCE: self.absence}
        return self.branches() | {k: m for k, m in extra.items() if m is not None}


class StructuralSide(nn.Module):
    """The structural stream: patch features, scored by the memory bank and, when given, by the
    positional memory (same features) and the composition model (which reuses the same
    features, or with ``CompositionConfig.image_size`` set takes a second pass on the input
    resized to that size).

    ``forward(x)``: (B, 3, s, s) normalised -> ``{"structural": (B, s, s)}`` plus, for the
    branches given, ``"positional"`` (B, h', w') on its pooled grid and ``"composition"``
    (B, s, s) with its ``"placement"`` (B, h, w) on the patch grid. The composition map is the
    image score at every pixel (its evidence is about the whole image); fusion decides where it
    counts (``CompositionConfig.fused_map``, ``FusionConfig.placement_power``).
    ``features_fn``, when set by a backend, computes the patch features in place of the
    module's own ``patch_features``, at any input size the detector uses: ``(x, fine)`` ->
    ``(features, grid, the raw fine levels or None)`` as :meth:`extract` returns them.
    """

    def __init__(
        self,
        structural: StructuralModel,
        composition: CompositionModel | None = None,
        positional: PositionalModel | None = None,
    ) -> None:
        super().__init__()
        self.structural = structural
        self.composition = composition
        self.positional = positional
        self.features_fn: FeaturesFn | None = None

    def extract(
        self, x: torch.Tensor, fine: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int], Fine | None]:
        """Patch features of ``x``, their grid and, with ``fine``, the raw fine levels
        (:meth:`engine.models.structural.PatchFeatures.with_fine`), through ``features_fn``
        when a backend set one."""
        if self.features_fn is not None:
            return self.features_fn(x, fine)
        patch_features = self.structural.patch_features
        if fine:
            return patch_features.with_fine(x)
        return (*patch_features(x), None)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        features, grid, fine = self.extract(x, self._fine_in_bank_pass(size[-1]))
        maps = {"structural": self.structural.map_from_features(features, grid, size)}
        if self.positional is not None:
            # Its distances, like the composition model's, are computed in float32 at every
            # precision.
            with torch.autocast(x.device.type, enabled=False):
                maps["positional"] = self.positional(features.float(), grid)
        if self.composition is None:
            return maps
        if self.composition.config.own_pass_size(size[-1]) is not None:
            features, grid, fine = self.composition_features(x)
        else:
            features = self.structural.patch_features.layout(features)
        # Mahalanobis distances lose too much in 16-bit arithmetic: the composition model runs
        # in float32 at every precision.
        with torch.autocast(x.device.type, enabled=False):
            image_score, _, placement, weights = self.composition(
                features.float(), grid, _float(fine)
            )
            if self.composition.absence is not None:
                maps[ABSENCE] = self.composition.absence(weights)
        maps["composition"] = image_score[:, None, None].expand(-1, *size).contiguous()
        maps[PLACEMENT] = placement
        return maps

    def composition_distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B, groups) the composition model's uncalibrated group distances of ``x``
        (:meth:`engine.models.composition.CompositionModel.group_distances`)."""
        features, grid, fine = self.composition_features(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.composition.group_distances(features.float(), grid, _float(fine))

    def composition_features(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int], Fine | None]:
        """The composition model's inputs for ``x`` from one pass at its size: patch
        features without the levels finer than their grid (``PatchFeatures.layout``), grid and,
        with fine parts, the raw fine levels."""
        if self.composition is None:
            raise ValueError("this detector has no composition branch")
        own_size = self.composition.config.own_pass_size(int(x.shape[-1]))
        x = x if own_size is None else resize_input(x, own_size)
        features, grid, fine = self.extract(x, self.composition.fine is not None)
        return self.structural.patch_features.layout(features), grid, fine

    def _fine_in_bank_pass(self, side: int) -> bool:
        """Whether the memory bank's pass must also return the fine levels (the composition
        branch has fine parts and reads the bank's features)."""
        c = self.composition
        return c is not None and c.fine is not None and c.config.own_pass_size(side) is None


def _float(fine: Fine | None) -> Fine | None:
    return None if fine is None else (fine[0].float(), fine[1].float())


class Detector:
    """Every branch and their fusion on one device.

    ``logical_fn`` maps a normalised (B, 3, S, S) batch to a (B, S, S) map and ``structural_fn``
    a (B, 3, s, s) batch to the structural stream's maps by branch (:class:`StructuralSide`); by
    default they are the
    eager modules; :mod:`engine.backends` swaps in compiled versions. ``structural_size`` is the
    structural module's input side (its config's ``image_size``). :attr:`fusion` (a
    :class:`~engine.models.fusion.Fusion`) holds the calibration as buffers: each branch's
    validation statistics (``stats`` and, for ``merge="max"``, ``image_stats`` and with
    ``background_quantile`` the ``backgrounds`` scales, when given), its
    fusion weight (``weights``, else the config's) and the decision threshold. Not thread-safe
    (it owns a CUDA stream and reusable state): use one per thread.
    """

    def __init__(
        self,
        logical: LogicalModel,
        structural: StructuralModel,
        fusion: FusionConfig,
        stats: dict[str, BranchStats] | None = None,
        *,
        structural_size: int,
        composition: CompositionModel | None = None,
        weights: dict[str, float] | None = None,
        image_stats: dict[str, BranchStats] | None = None,
        positional: PositionalModel | None = None,
        backgrounds: dict[str, float] | None = None,
    ) -> None:
        self.logical = logical.eval()
        self.structural = structural.eval()
        self.composition = composition.eval() if composition is not None else None
        self.positional = positional.eval() if positional is not None else None
        self.structural_side = StructuralSide(self.structural, self.composition, self.positional)
        self.fusion = Fusion.from_config(
            fusion,
            self.branch_names,
            self.map_size,
            None if self.composition is None else self.composition.config,
            weights,
        )
        if stats is not None:
            self.fusion.calibrate(stats, image_stats, backgrounds)
        self.logical_transform = model_transform(logical.config.image_size, logical.encoder)
        self.structural_transform = model_transform(
            structural_size, structural.patch_features.backbone
        )
        self.logical_fn: MapFn = logical.anomaly_map
        self.structural_fn: StructuralFn = self.structural_side
        self._side_stream: torch.cuda.Stream | None = None
        self._logical_worker: ThreadPoolExecutor | None = None
        self.precision = "fp32"
        self.stage_timer: StageTimer | None = None  # set to time each stage (profiling only)

    def set_precision(self, precision: str) -> None:
        """Run the networks in ``precision`` (a key of :data:`PRECISIONS`)."""
        self.structural.set_search_dtype(check_precision(precision))
        self.precision = precision

    def fold_batchnorm(self) -> int:
        """Fold the BatchNorms of both networks into their convolutions, in place (deployment:
        see :mod:`engine.models.folding`); returns how many were folded."""
        generator = torch.Generator().manual_seed(0)
        x_logical, x_structural = (
            torch.randn(1, 3, side, side, generator=generator).to(self.device)
            for side in (self.map_size, self.structural_transform.size)
        )
        features = self.structural.patch_features
        return fold_batchnorm(
            self.logical, lambda: self.logical.anomaly_map(x_logical)
        ) + fold_batchnorm(features, lambda: features(x_structural))

    def overlap_logical(self, enabled: bool) -> None:
        """On CPU, run :attr:`logical_fn` on a worker thread while the structural stream runs on
        the calling thread (the CPU counterpart of the CUDA side stream).

        Worth it when the two do not share one thread pool: the ``onnx`` backend's logical
        graph runs in ONNX Runtime's pool while the structural stream's search, positional
        memory and composition run in PyTorch's and FAISS's, several of them small operations
        that leave cores idle (docs/PERFORMANCE.md). The maps do not change. No effect on CUDA.
        """
        if not enabled:
            if self._logical_worker is not None:
                self._logical_worker.shutdown(wait=True)
            self._logical_worker = None
        elif self._logical_worker is None:
            self._logical_worker = ThreadPoolExecutor(1, thread_name_prefix="npgmf-logical")

    @property
    def branch_names(self) -> tuple[str, ...]:
        """The branches this detector runs, in :data:`engine.calibrate.BRANCHES` order."""
        optional = {"positional": self.positional, "composition": self.composition}
        return tuple(b for b in BRANCHES if b not in optional or optional[b] is not None)

    @property
    def device(self) -> torch.device:
        return next(self.logical.decoder.parameters()).device

    @property
    def stats(self) -> dict[str, BranchStats] | None:
        """Each branch's validation statistics, None until calibrated."""
        return self.fusion.stats

    @property
    def weights(self) -> dict[str, float]:
        """Each branch's fusion weight."""
        return self.fusion.weights

    @property
    def shares_input(self) -> bool:
        """Whether both streams take the same preprocessed input (one pass serves both)."""
        return self.logical_transform == self.structural_transform

    @property
    def map_size(self) -> int:
        """Side of the fused map: the logical module's input size."""
        return self.logical.config.image_size

    def to(self, device: torch.device | str) -> Detector:
        device = torch.device(device)
        self.logical.to(device)
        self.structural_side.to(device)
        self.fusion.to(device)
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        return self

    def fuse(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fused (B, S, S) map of same-size branch ``maps`` (:meth:`Maps.fusion_inputs`)
        with the calibrated statistics."""
        return self.fusion(maps)

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> Maps:
        """uint8 RGB frames (B, H, W, 3) on :attr:`device` -> :class:`Maps` at model size."""
        with self._stage("preprocess"):
            # The layout is given: a frame of height 3, (B, 3, W, 3), would look ambiguous.
            x_logical = self.logical_transform.batch(frames, channels_last=True)
            x_structural = (
                x_logical
                if self.shares_input
                else self.structural_transform.batch(frames, channels_last=True)
            )
        with self._autocast():
            logical, side = self._branches(x_logical, x_structural)
        size = (self.map_size, self.map_size)
        # Shrinking a finer structural grid to the fused map low-pass filters it first.
        resized = {b: resize_to(m.float(), size, antialias=True) for b, m in side.items()}
        maps = Maps(logical.float(), **resized)
        if self.stats is not None:
            with self._stage("fuse"):
                maps.fused = self.fuse(maps.fusion_inputs())
        return maps

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """An NVTX range, and the stage's time when :attr:`stage_timer` is set."""
        with nvtx_range(name):
            if self.stage_timer is None:
                yield
                return
            self.stage_timer.start(name)
            yield
            self.stage_timer.stop(name)

    @torch.inference_mode()
    def _run_logical(self, x: torch.Tensor) -> torch.Tensor:
        # Inference mode and autocast are per thread: set here for the worker thread too.
        with self._stage("logical"), self._autocast():
            return self.logical_fn(x)

    def _autocast(self) -> AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _branches(
        self, x_logical: torch.Tensor, x_structural: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logical map, the structural stream's maps by branch); on CUDA the structural stream
        runs on the side stream, concurrently with the logical branch, and on CPU with
        :meth:`overlap_logical` the logical branch runs on the worker thread."""
        if self._side_stream is None:
            if self._logical_worker is None:
                with self._stage("structural"):
                    side = self.structural_fn(x_structural)
                return self._run_logical(x_logical), side
            logical = self._logical_worker.submit(self._run_logical, x_logical)
            try:
                with self._stage("structural"):
                    side = self.structural_fn(x_structural)
            finally:
                wait([logical])  # even on an error: no frame's work outlives its call
            return logical.result(), side
        main = torch.cuda.current_stream(self.device)
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream), self._stage("structural"):
            side = self.structural_fn(x_structural)
        logical = self._run_logical(x_logical)
        main.wait_stream(self._side_stream)
        for tensor in side.values():
            tensor.record_stream(main)
        return logical, side


def model_transform(size: int, backbone) -> ImageTransform:
    """The model-input transform of a backbone: its weights carry their mean/std."""
    return ImageTransform(size, backbone.weights.mean, backbone.weights.std)
