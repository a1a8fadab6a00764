"""The ``onnx`` backend: both networks exported with the dynamo exporter, run by ONNX Runtime.

Two graphs, each with a dynamic batch dimension: the logical branch (normalised image -> map)
and the structural patch features (normalised image -> (B, h*w, D) features), the latter once
more at the composition branch's own input size when it has one. The memory-bank
search (FAISS or :func:`kernels.knn_min`), the positional memory, the composition model and
fusion stay in PyTorch: they consume the features, and the search is one BLAS product that ONNX
Runtime would not run faster. The logical graph runs on a worker thread, concurrently with the
structural stream (:meth:`~engine.detector.Detector.overlap_logical`). On CPU the graphs run on
ONNX Runtime's CPU provider; on CUDA on its CUDA provider (the ``onnxruntime-gpu`` package), not
yet run on a GPU (docs/PERFORMANCE.md). Either way the tensors are bound in place (IO binding):
ONNX Runtime reads the input and writes each output straight into PyTorch tensors on the
detector's device, so no map makes a round trip through the host.

Exporting takes tens of seconds, so the graphs are cached in
``$XDG_CACHE_HOME/npgmf-engine/onnx/<key>`` (default ``~/.cache/...``, beside the synthetic data
cache), keyed by a hash of the weights, input sizes and library versions:
a changed artifact never meets a stale graph. The cache is written atomically; where it cannot
be written the graphs are exported into a temporary folder for this process only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.detector import Detector

log = logging.getLogger(__name__)
MAX_BATCH = 256  # the exported graphs accept batches of 1..MAX_BATCH
INPUT_NAME = "x"  # the exported graphs' input: the exporter names it after forward's argument


def onnx_available() -> bool:
    return all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript"))


def onnx_providers() -> list[str]:
    """ONNX Runtime's execution providers in this install (``CUDAExecutionProvider`` only in
    the ``onnxruntime-gpu`` build)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def onnx_cuda_available() -> bool:
    """Whether the backend can run on CUDA here: ONNX Runtime with its CUDA provider."""
    return onnx_available() and "CUDAExecutionProvider" in onnx_providers()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "npgmf-engine" / "onnx"


class _Method(nn.Module):
    """A module method as a module (what the exporter takes): ``forward(x) = method(x)``."""

    def __init__(self, owner: nn.Module, method: str, first_only: bool = False) -> None:
        super().__init__()
        self.owner, self.method, self.first_only = owner, method, first_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.owner, self.method)(x)
        return out[0] if self.first_only else out


class _WithFine(nn.Module):
    """:meth:`~engine.models.structural.PatchFeatures.with_fine` as a graph of three tensor
    outputs: the patch features and the two raw fine levels."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, _, (layer1, layer2) = self.features.with_fine(x)
        return features, layer1, layer2


def default_providers(device: torch.device) -> list:
    """ONNX Runtime's providers for ``device``: its CUDA provider first on CUDA, then the CPU."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": cuda_index(device)}), "CPUExecutionProvider"]


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else 0


class OrtFunction:
    """An ONNX Runtime session called like the module it was exported from: a float32 tensor
    in, float32 tensors out, on ``device`` (CPU, or CUDA through ONNX Runtime's CUDA provider,
    or the ``providers`` given).

    The graphs' dimensions are static but for the batch (:func:`_export`), so every output is
    allocated from the input's batch size and bound in place for ONNX Runtime to fill. A batch
    larger than ``max_batch`` runs in chunks of at most that many images."""

    def __init__(
        self,
        path: Path,
        threads: int,
        device: torch.device | None = None,
        providers: list | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        import onnxruntime as ort

        self.path = path
        self.device = torch.device("cpu") if device is None else device
        self.device_id = cuda_index(self.device) if self.device.type == "cuda" else 0
        self.max_batch = max_batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle ONNX Runtime workers spin by default: on a small CPU that steals the cores from
        # the PyTorch and FAISS work between two graph runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            providers = default_providers(self.device)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.output_shapes = [_static_tail(out, path) for out in self.session.get_outputs()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph, in order, on the session's device."""
        if x.shape[0] > self.max_batch:
            chunks = [self.outputs(chunk) for chunk in x.split(self.max_batch)]
            return [torch.cat(parts) for parts in zip(*chunks, strict=True)]
        x = x.detach().to(self.device, torch.float32).contiguous()
        place = self.device.type
        binding = self.session.io_binding()
        binding.bind_input(
            self.input, place, self.device_id, np.float32, tuple(x.shape), x.data_ptr()
        )
        outputs = []
        for name, tail in self.output_shapes:
            out = torch.empty((x.shape[0], *tail), dtype=torch.float32, device=self.device)
            binding.bind_output(
                name, place, self.device_id, np.float32, tuple(out.shape), out.data_ptr()
            )
            outputs.append(out)
        if place == "cuda":
            # ONNX Runtime runs on its own stream: the input must be written before it reads.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return outputs


def _static_tail(output: object, path: Path) -> tuple[str, tuple[int, ...]]:
    """An ONNX output's name and its dimensions after the batch, which must be fixed numbers
    (float32) for the output to be allocated before the run."""
    name, shape, kind = output.name, output.shape, output.type
    tail = tuple(shape[1:])
    if kind != "tensor(float)" or not all(isinstance(d, int) for d in tail):
        raise RuntimeError(
            f"{path}: output {name!r} is {kind} of shape {shape}; the onnx backend binds float32 "
            "outputs whose dimensions after the batch are fixed (delete the cached graph to "
            "export it again)"
        )
    return name, tail


class OrtPatchFeatures:
    """:class:`~engine.models.structural.PatchFeatures` through ONNX Runtime, called as
    :meth:`engine.detector.StructuralSide.extract`: ``(x, fine)`` -> ``(features, grid, fine
    levels or None)`` from the graph exported for the input's side (one per size the detector
    uses; a graph exported with the fine levels also serves ``fine=False``), the grid being
    fixed by that size."""

    def __init__(self, graphs: dict[int, tuple[OrtFunction, tuple[int, int], bool]]) -> None:
        self.graphs = graphs

    def functions(self) -> list[OrtFunction]:
        """The sessions, one per exported size."""
        return [function for function, _, _ in self.graphs.values()]

    def __call__(
        self, x: torch.Tensor, fine: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None]:
        side = int(x.shape[-1])
        if side not in self.graphs:
            raise ValueError(
                f"no exported patch-feature graph for {side}-px inputs "
                f"(exported: {sorted(self.graphs)})"
            )
        function, grid, has_fine = self.graphs[side]
        if fine and not has_fine:
            raise ValueError(f"the {side}-px patch-feature graph was exported without fine levels")
        if not has_fine:
            return function(x), grid, None
        features, layer1, layer2 = function.outputs(x)
        return features, grid, (layer1, layer2) if fine else None


def feature_sizes(detector: Detector) -> tuple[int, ...]:
    """Input sides of the patch-feature passes: the memory bank's, then the composition
    branch's own when it has one (``CompositionConfig.image_size``)."""
    bank_size = detector.structural_transform.size
    if detector.composition is None:
        return (bank_size,)
    own_size = detector.composition.config.own_pass_size(bank_size)
    return (bank_size,) if own_size is None else (bank_size, own_size)


def fine_size(detector: Detector) -> int | None:
    """The input side whose patch-feature pass feeds the composition branch's fine parts, or
    None without them."""
    composition = detector.composition
    if composition is None or composition.fine is None:
        return None
    return feature_sizes(detector)[-1]


def graph_key(detector: Detector) -> str:
    """Hash of everything the exported graphs depend on."""
    import onnxscript

    digest = hashlib.sha256()
    sizes = (detector.map_size, *feature_sizes(detector))
    fine = fine_size(detector)
    digest.update(
        f"{torch.__version__} {onnxscript.__version__} {sizes} {MAX_BATCH} {fine}".encode()
    )
    for module in (detector.logical, detector.structural.patch_features):
        # Buffers include the non-persistent ones (the structural projections).
        for name, tensor in chain(module.named_parameters(), module.named_buffers()):
            digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _export(module: nn.Module, size: int, path: Path, device: torch.device) -> None:
    """Export ``module`` (on ``device``) for (B, 3, size, size) inputs to ``path``, atomically."""
    example = torch.zeros(2, 3, size, size, device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            dynamic_shapes={INPUT_NAME: {0: batch}},
            verbose=False,
        )
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        program.save(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _graph_folder(key: str) -> Path:
    folder = cache_root() / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return folder
    except OSError as error:
        fallback = Path(tempfile.mkdtemp(prefix="npgmf-onnx-"))
        log.warning(
            "cannot write the ONNX cache %s (%s); exporting into %s", folder, error, fallback
        )
        return fallback


def apply_onnx(
    detector: Detector,
    providers: Callable[[Path, int], list] | None = None,
    max_batch: int = MAX_BATCH,
) -> None:
    """Swap the networks of ``detector`` for ONNX Runtime sessions on its device, exported now
    or read from the cache. ``providers(graph path, input side)``: each session's execution
    providers (default: :func:`default_providers`); ``max_batch``: the most images one session
    run takes (:class:`OrtFunction`)."""
    device, threads = detector.device, torch.get_num_threads()

    def session(path: Path, size: int) -> OrtFunction:
        chosen = None if providers is None else providers(path, size)
        return OrtFunction(path, threads, device, chosen, max_batch)

    folder = _graph_folder(graph_key(detector))
    logical_path = folder / "logical.onnx"
    features = detector.structural.patch_features
    if not logical_path.is_file():
        log.info("exporting the logical branch to ONNX (%s)", logical_path)
        _export(_Method(detector.logical, "anomaly_map"), detector.map_size, logical_path, device)
    graphs = {}
    for i, size in enumerate(feature_sizes(detector)):
        # The memory bank's graph keeps its plain name; a second pass's is named by its size.
        path = folder / ("features.onnx" if i == 0 else f"features_{size}.onnx")
        has_fine = size == fine_size(detector)
        if not path.is_file():
            log.info("exporting the structural features at %d px to ONNX (%s)", size, path)
            graph = _WithFine(features) if has_fine else _Method(features, "forward", True)
            _export(graph, size, path, device)
        with torch.no_grad():
            _, grid = features(torch.zeros(1, 3, size, size, device=device))
        graphs[size] = (session(path, size), grid, has_fine)
    detector.logical_fn = session(logical_path, detector.map_size)
    detector.structural_side.features_fn = OrtPatchFeatures(graphs)
    detector.structural_fn = detector.structural_side
    # ONNX Runtime's pool runs the logical graph while PyTorch's and FAISS's run the rest.
    detector.overlap_logical(True)
