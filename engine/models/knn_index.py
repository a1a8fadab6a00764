"""Nearest-neighbour search over the structural memory bank: exact torch brute force, or any
FAISS index named by a factory string.

``structural.index`` (and :func:`make_index`) takes:

- ``"torch"``: exact chunked brute force through :func:`kernels.knn_min` (Triton on CUDA tensors,
  the PyTorch reference elsewhere); needs no FAISS; k = 1 only. The choice on CUDA when FAISS has
  no GPU support.
- a FAISS factory string, built on CPU with ``faiss.index_factory(d, spec, faiss.METRIC_L2)``:
  ``"Flat"`` (exact), ``"HNSW32"`` (a graph), ``"IVF256,Flat"`` (inverted lists),
  ``"IVF1024,PQ64"`` (inverted lists of product-quantised codes), ... Indexes that need training
  are trained on the bank itself. ``structural.index_params`` sets FAISS parameters in
  ``ParameterSpace`` syntax (``"efSearch=64"``, ``"nprobe=32,ht=40"``) on top of the engine's
  defaults, ``efSearch=128``, ``nprobe=16`` and ``k_factor_rf=16``, each applied where the index
  has it (FAISS's own efSearch of 16 changes image scores by up to 100 %, docs/PERFORMANCE.md;
  its own k_factor of 1 lets a refinement stage such as ``RFlat`` re-rank a single candidate).
- ``"faiss_gpu"``: exact ``Flat`` on a GPU; needs a FAISS build with GPU support and a GPU.
- ``"auto"``: ``torch`` on CUDA or without FAISS; else ``Flat``, except that a build on a CPU
  whose bank reaches :data:`AUTO_APPROXIMATE_ROWS` rows gets inverted lists of 4-bit
  product-quantised codes re-ranked by exact distance (:func:`auto_index`), searched with
  ``nprobe=8`` (:func:`auto_index_params`); ``auto`` takes no ``index_params`` of its own.
- The names of earlier versions are read as factory strings
  (:data:`engine.models.knn_compat.OLD_NAMES`):
  ``faiss_flat`` = ``Flat``, ``faiss_hnsw`` = ``HNSW32`` (efConstruction 40, efSearch 128),
  ``faiss_ivfpq`` = ``IVF1024,PQ64`` (nprobe 16).

An index is **exact** when FAISS builds an ``IndexFlat``; any other is **approximate**: it can
miss the true nearest neighbour. Whatever the index, the distance returned is the Euclidean (not
squared) float32 distance from the query to the bank row found, recomputed from the bank, since
FAISS returns squared and, for compressed codes, estimated distances. Scores thus depend on the
index only through the rows it finds.

Saving writes a folder: ``bank.npy`` (the exact float32 bank), ``index.json`` (:attr:`identity`)
and, for an approximate index, ``index.faiss`` (``faiss.write_index``, read back with
``faiss.read_index``): rebuilding it need not reproduce it (k-means training, a graph built by
several threads). An exact index is rebuilt from the bank, bit-exactly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models.knn_compat import upgrade_identity, upgrade_spec
from kernels import knn_min
from kernels.knn_args import bank_sq_norms

__all__ = [
    "AUTO_APPROXIMATE_ROWS",
    "CHOICES",
    "KnnIndex",
    "auto_faiss_spec",
    "auto_faiss_specs",
    "auto_index",
    "auto_index_params",
    "check_index_setting",
    "faiss_available",
    "faiss_gpu_available",
    "is_approximate",
    "make_index",
    "parse_params",
    "restore_index",
]

CHOICES = ("auto", "torch", "faiss_gpu")  # the settings that are not FAISS factory strings
DEFAULT_PARAMS = {"efSearch": 128.0, "nprobe": 16.0, "k_factor_rf": 16.0}
EXAMPLES = (
    "'auto', 'torch', 'faiss_gpu' or a FAISS factory string such as 'Flat', 'HNSW32', "
    "'IVF256,Flat' or 'IVF1024,PQ64'"
)
# From this bank size on, exact search dominates a CPU frame (2.2 s at LOCO size, 80 640 rows)
# while the approximate index of auto_faiss_spec keeps image AUROC and AU-sPRO within 0.003 of
# it at a fiftieth of the search time (docs/PERFORMANCE.md); a LOCO-size category at the cpu
# preset's 384 px has about 80k rows.
AUTO_APPROXIMATE_ROWS = 50_000
# auto's approximate pick probes 8 of its lists, not DEFAULT_PARAMS' 16: on four LOCO-size
# builds image AUROC and AU-sPRO stayed within 0.003 of exact search, and a frame takes 9-12 ms
# less on 2 cores (docs/PERFORMANCE.md). Not a global default: IVF1024,Flat at nprobe 8 moved a
# subset by 0.006.
AUTO_APPROXIMATE_PARAMS = "nprobe=8"
# FAISS aborts the whole process (an assertion, not an exception) on e.g. HNSW0 or IVF0.
_ZERO_SIZE = re.compile(r"(?<![\d.])0+(?![\d.])")
_PROBE_DIM = 64  # features' dimension for checking a spec's spelling before it is known


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_available() -> bool:
    """Whether FAISS is installed with GPU support and sees at least one GPU."""
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def parse_params(params: str) -> dict[str, float]:
    """``"name=value,..."`` FAISS parameters as {name: value}, later names winning; every value
    must be a positive number (ValueError naming ``structural.index_params``)."""
    out: dict[str, float] = {}
    for item in params.split(",") if params.strip() else []:
        name, sep, text = (part.strip() for part in item.partition("="))
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (sep and name.isidentifier() and math.isfinite(value) and value > 0):
            raise ValueError(
                f"structural.index_params={params!r}: {item!r} is not name=positive number; "
                "expected e.g. 'efSearch=128' or 'nprobe=16,ht=40'"
            )
        out[name] = value
    return out


def _format(params: dict[str, float]) -> str:
    """Inverse of :func:`parse_params` (integers without a decimal point)."""
    shown = {n: int(v) if v.is_integer() else v for n, v in params.items()}
    return ",".join(f"{name}={value!r}" for name, value in shown.items())


def _faiss_reason(error: Exception) -> str:
    """FAISS's own words from one of its C++ exceptions, without the source location."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split("failed: ")[-1] if "failed: " in line else line.rsplit(": ", 1)[-1]


class _Unparsable(ValueError):
    """A spec FAISS cannot read at all (as opposed to one that does not fit a dimension)."""


def _new_faiss_index(spec: str, dim: int) -> Any:
    """``faiss.index_factory(dim, spec, METRIC_L2)``; ValueError naming ``structural.index``."""
    import faiss

    if _ZERO_SIZE.search(spec):
        raise _Unparsable(f"structural.index={spec!r}: a size of 0 is not an index; use {EXAMPLES}")
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_L2)
    except RuntimeError as error:
        reason = _faiss_reason(error)
        if "could not parse" in reason or "stoi" in reason:
            raise _Unparsable(
                f"structural.index={spec!r} is not a FAISS index factory string ({reason}); "
                f"use {EXAMPLES}"
            ) from None
        raise ValueError(
            f"structural.index={spec!r} cannot index the {dim}-d structural features ({reason})"
        ) from None


def _apply_params(index: Any, spec: str, params: dict[str, float], defaults: bool = True) -> str:
    """Set ``params`` (after :data:`DEFAULT_PARAMS` the index has, with ``defaults``) on a FAISS
    index; returns the ones set as a string. ValueError when one of ``params`` does not apply."""
    import faiss

    space, applied = faiss.ParameterSpace(), {}
    wanted = {**DEFAULT_PARAMS, **params} if defaults else params
    for name, value in wanted.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError as error:
            if name in params:
                raise ValueError(
                    f"structural.index_params: {_format({name: value})} does not apply to the "
                    f"index {spec!r} ({_faiss_reason(error)})"
                ) from None
            continue  # a default for another kind of index
        applied[name] = value
    return _format(applied)


def check_index_setting(spec: str, params: str, dim: int | None = None) -> None:
    """Raise ValueError, naming ``structural.index`` or ``structural.index_params`` and the
    value, unless ``spec`` with ``params`` makes an index of ``dim``-d features.

    ``dim=None`` (a config, before its features' dimension is known; settings applied one at a
    time): only the spelling of each setting is checked. Without FAISS a factory string is left
    to :func:`engine.preflight.check_index_kind`, which refuses it.
    """
    parsed = parse_params(params)
    if not spec.strip():
        raise ValueError(f"structural.index={spec!r}: empty; use {EXAMPLES}")
    if spec in CHOICES:
        if parsed and dim is not None:
            hint = (
                f"; auto sets its own on the index it picks ({AUTO_APPROXIMATE_PARAMS} on "
                "inverted lists): to choose them, name the index, e.g. "
                "structural.index='IVF256,PQ76x4fs,RFlat'"
                if spec == "auto"
                else ""
            )
            raise ValueError(
                f"structural.index_params={params!r}: structural.index={spec!r} takes no "
                f"parameters (they are for FAISS indexes such as 'HNSW32' or 'IVF256,Flat'){hint}"
            )
        return
    if not faiss_available():
        return
    try:
        index = _new_faiss_index(spec, dim or _PROBE_DIM)
    except _Unparsable:
        raise
    except ValueError:
        if dim is not None:
            raise
        return  # may fit the features' true dimension: checked again once it is known
    if dim is not None:
        _apply_params(index, spec, parsed)


def _check_bank(bank: torch.Tensor) -> torch.Tensor:
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or 0 in bank.shape:
        raise ValueError(
            f"the bank must be a non-empty (M, D) tensor, got {getattr(bank, 'shape', bank)}"
        )
    if not bank.is_floating_point():
        raise ValueError(f"the bank must be floating point, got {bank.dtype}")
    if not torch.isfinite(bank).all():
        raise ValueError("the bank contains NaN or infinite values")
    return bank


class KnnIndex:
    """An (M, D) float32 bank and its search: a FAISS index, or exact torch brute force.

    Made by :func:`make_index` (empty; :meth:`add` sets the bank), :meth:`load` or
    :func:`restore_index`. ``search`` takes (Q, D) queries and returns (Q, k) float32 Euclidean
    distances, ascending, and (Q, k) int64 bank row indices, on the device of ``queries``.
    """

    def __init__(self, spec: str, params: str = "", device: str | torch.device = "cpu") -> None:
        self.spec = spec  # "torch" or a FAISS factory string
        self.params = params  # as asked; the ones in force are in ``identity`` once built
        self.device = torch.device(device)  # where the torch search keeps the bank
        self.gpu = False  # a FAISS GPU index (faiss_gpu)
        self.bank: torch.Tensor | None = None
        self.exact: bool | None = True if spec == "torch" else None  # known once built
        self._applied = ""
        self._faiss: Any = None
        self._bank_sq: torch.Tensor | None = None
        self._gpu_resources: Any = None

    @property
    def identity(self) -> dict[str, Any]:
        """What the manifest records about this index."""
        size, dim = (0, 0) if self.bank is None else tuple(self.bank.shape)
        if self.spec == "torch":
            return {"kind": "torch", "size": size, "dim": dim}
        return {
            "kind": "faiss",
            "spec": self.spec,
            "params": self._applied,
            "exact": self.exact,
            "size": size,
            "dim": dim,
        }

    def add(self, bank: torch.Tensor) -> None:
        """Set the (M, D) bank (replacing any previous one; kept as float32) and build on it.

        ValueError when the spec does not fit D, or its training (IVF, PQ, ...) cannot run on M
        rows; the index is then left as it was."""
        bank = _check_bank(bank).detach().float().contiguous()
        if self.spec == "torch":
            self.bank = bank.to(self.device)
            self._bank_sq = bank_sq_norms(self.bank)
        else:
            self._build_faiss(bank.cpu().numpy())
            self.bank = bank.cpu()

    def _build_faiss(self, vectors: np.ndarray) -> None:
        import faiss

        index = _new_faiss_index(self.spec, vectors.shape[1])
        applied = _apply_params(index, self.spec, parse_params(self.params))
        if not index.is_trained:
            try:
                index.train(vectors)
            except RuntimeError as error:
                raise ValueError(
                    f"structural.index={self.spec!r} cannot be trained on the "
                    f"{vectors.shape[0]}-row memory bank ({_faiss_reason(error)}); use fewer "
                    "inverted lists or code bits, or an index that needs no training such as "
                    "'HNSW32' or 'Flat'"
                ) from None
        index.add(vectors)
        exact = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
        if self.gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        self._faiss, self.exact, self._applied = index, exact, applied

    def _check_queries(self, queries: torch.Tensor, k: int) -> None:
        if self.bank is None:
            raise ValueError(f"the {self.spec} index is empty: call add(bank) first")
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
            raise ValueError(
                f"queries must be a (Q, D) tensor, got {getattr(queries, 'shape', queries)}"
            )
        if queries.shape[1] != self.bank.shape[1]:
            raise ValueError(
                f"queries have dim {queries.shape[1]}, the bank has {self.bank.shape[1]}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.bank.shape[0]:
            raise ValueError(f"k must be an int in [1, {self.bank.shape[0]}], got {k!r}")

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_queries(queries, k)
        if self.spec != "torch":
            return self._faiss_search(queries, k)
        if k != 1:
            raise RuntimeError("the torch kNN index supports k=1 only; use a FAISS index for k > 1")
        dist, idx = knn_min(queries.to(self.device), self.bank, bank_sq=self._bank_sq)
        return dist[:, None].to(queries.device), idx[:, None].to(queries.device)

    # FAISS is a C++ call through host numpy: torch.compile must run it as it is (Dynamo cannot
    # trace SWIG pointers and would fail the frame's guards).
    @torch.compiler.disable
    def _faiss_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.bank is not None
        q = queries.detach().float().cpu().contiguous()
        _, found = self._faiss.search(q.numpy(), k)
        idx = torch.from_numpy(found.astype(np.int64))
        missing = (idx < 0).any(dim=1)  # IVF: the probed lists held fewer than k rows
        if missing.any():
            idx[missing] = torch.cdist(q[missing], self.bank).topk(k, largest=False).indices
        dist = torch.linalg.vector_norm(q[:, None, :] - self.bank[idx], dim=-1)
        dist, order = dist.sort(dim=1, stable=True)
        return dist.to(queries.device), idx.gather(1, order).to(queries.device)

    def save(self, path: str | Path) -> None:
        """Write the index into folder ``path`` (created if missing)."""
        if self.bank is None:
            raise ValueError("cannot save an empty index")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "bank.npy", self.bank.cpu().numpy())
        (folder / "index.json").write_text(json.dumps(self.identity, indent=2, sort_keys=True))
        if not self.exact:
            import faiss

            faiss.write_index(self._faiss, str(folder / "index.faiss"))

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> KnnIndex:
        """Read a folder written by :meth:`save` (or by an earlier version); the torch index
        puts the bank on ``device``."""
        folder = Path(path)
        meta_path, bank_path = folder / "index.json", folder / "bank.npy"
        for required in (meta_path, bank_path):
            if not required.is_file():
                raise FileNotFoundError(f"kNN index file missing: {required}")
        try:
            meta = upgrade_identity(json.loads(meta_path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{meta_path} is not a valid index description: {error}") from error
        bank = np.load(bank_path, allow_pickle=False)
        if tuple(bank.shape) != (meta.get("size"), meta.get("dim")):
            raise ValueError(f"{bank_path} has shape {tuple(bank.shape)}, {meta_path} says {meta}")
        if is_approximate(meta):
            import faiss

            index_file = folder / "index.faiss"
            if not index_file.is_file():
                raise FileNotFoundError(f"kNN index file missing: {index_file}")
            return _restored(meta, bank, faiss.read_index(str(index_file)))
        index = make_index(meta.get("spec", "torch"), device, meta.get("params", ""))
        index.add(torch.from_numpy(bank))
        return index


def auto_index(device: str | torch.device, rows: int | None = None, dim: int | None = None) -> str:
    """The index ``auto`` stands for when searching from ``device`` a bank of ``rows`` x ``dim``
    (rows None: an exact index whatever the size, as when an artifact's exact index is rebuilt):
    ``torch`` on CUDA or without FAISS, else :func:`auto_faiss_spec`."""
    if torch.device(device).type == "cuda" or not faiss_available():
        return "torch"
    return auto_faiss_spec(rows, dim)


def auto_index_params(spec: str) -> str:
    """The FAISS parameters ``auto`` sets on the index ``spec`` it picked (on top of
    :data:`DEFAULT_PARAMS`): :data:`AUTO_APPROXIMATE_PARAMS` for its approximate pick, none for
    exact search."""
    return "" if spec in ("Flat", "torch") else AUTO_APPROXIMATE_PARAMS


def auto_faiss_spec(rows: int | None, dim: int | None = None) -> str:
    """The FAISS index ``auto`` picks on a CPU for a bank of ``rows`` x ``dim``: ``Flat``; from
    :data:`AUTO_APPROXIMATE_ROWS` rows on, ``IVF{n},PQ{m}x4fs,RFlat``: n inverted lists (n the
    power of two nearest sqrt(rows)) of 4-bit product codes (m sub-quantizers of two dimensions
    each, of one where ``dim`` is odd) scanned with SIMD table lookups, and the best
    ``k_factor_rf`` candidates of each query re-ranked by exact distance. The scan reads a few
    bytes per row where ``IVF{n},Flat`` reads the whole float32 row, which bounds a CPU search."""
    if rows is None or rows < AUTO_APPROXIMATE_ROWS:
        return "Flat"
    if dim is None or dim < 1:
        raise ValueError(f"auto_faiss_spec needs the dimension of the {rows}-row bank, got {dim}")
    lists = _nearest_power_of_two(math.sqrt(rows))
    return f"IVF{lists},PQ{dim // 2 if dim % 2 == 0 else dim}x4fs,RFlat"


def auto_faiss_specs(rows: int, dim: int) -> tuple[str, ...]:
    """Every FAISS index a CPU build with ``auto`` may have saved for a ``rows`` x ``dim`` bank:
    this version's pick first, then that of earlier versions (``IVF{n},Flat``, n the power of
    two nearest 4 sqrt(rows))."""
    current = auto_faiss_spec(rows, dim)
    if current == "Flat":
        return (current,)
    return current, f"IVF{_nearest_power_of_two(4 * math.sqrt(rows))},Flat"


def _nearest_power_of_two(x: float) -> int:
    return 2 ** round(math.log2(x))


def make_index(
    spec: str = "auto", device: str | torch.device = "cpu", params: str = ""
) -> KnnIndex:
    """An empty index for the setting ``spec`` (module docstring) searched from ``device``.

    ``auto``: an exact index, ``torch`` when ``device`` is CUDA or FAISS is missing, else
    ``Flat`` (a build resolves it by bank size first, :func:`auto_index`). ValueError for a
    misspelt setting; RuntimeError when it needs a FAISS this installation lacks.
    """
    spec = upgrade_spec(spec)
    check_index_setting(spec, params)
    if spec == "auto":
        spec = auto_index(device)
    if spec in CHOICES and parse_params(params):
        raise ValueError(f"structural.index_params={params!r}: the {spec} index takes none")
    if spec == "torch":
        return KnnIndex("torch", device=device)
    if not faiss_available():
        raise RuntimeError(f"the kNN index {spec!r} needs faiss, which is not installed")
    if spec == "faiss_gpu":
        if not faiss_gpu_available():
            raise RuntimeError(
                "the faiss_gpu kNN index needs a FAISS build with GPU support and a visible GPU; "
                "this installation has none (use 'torch' for GPU search)"
            )
        index = KnnIndex("Flat")
        index.gpu = True
        return index
    return KnnIndex(spec, params)


def is_approximate(identity: dict[str, Any]) -> bool:
    """Whether an (upgraded) identity describes an approximate FAISS index, the kind that is
    saved with ``faiss.write_index`` rather than rebuilt from the bank."""
    return identity.get("kind") == "faiss" and identity.get("exact") is False


def restore_index(identity: dict[str, Any], bank: np.ndarray, raw: bytes) -> KnnIndex:
    """The saved approximate index described by (upgraded) ``identity``, from its (M, D) float32
    bank and the bytes of its ``index.faiss``; ValueError when they are not such an index."""
    import faiss

    if not is_approximate(identity):
        raise ValueError(f"{identity} does not describe a saved (approximate) FAISS index")
    return _restored(identity, bank, faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8)))


def _restored(identity: dict[str, Any], bank: np.ndarray, searcher: Any) -> KnnIndex:
    """A :class:`KnnIndex` around the FAISS index read back, checked against ``identity``: the
    class ``index_factory`` makes for its spec, and the bank's size and dimension."""
    spec, params = identity["spec"], identity["params"]
    wanted = type(_new_faiss_index(spec, bank.shape[1])).__name__
    if type(searcher).__name__ != wanted or (searcher.ntotal, searcher.d) != bank.shape:
        raise ValueError(
            f"index.faiss is not a {wanted} ({spec!r}) of the {bank.shape} bank: found a "
            f"{type(searcher).__name__} of {searcher.ntotal} x {searcher.d}"
        )
    index = KnnIndex(spec, params)
    index.bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    index._applied = _apply_params(searcher, spec, parse_params(params), defaults=False)
    index.exact, index._faiss = False, searcher
    return index
