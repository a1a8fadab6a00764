"""Nearest-neighbour search over the structural memory bank, behind one interface.

Every backend returns **Euclidean** (not squared) distances as float32 torch tensors, so the
scores do not depend on the backend:

- ``torch``: exact chunked brute force through :func:`kernels.knn_min` (Triton on CUDA tensors,
  the PyTorch reference elsewhere); needs no FAISS; k = 1 only.
- ``faiss_flat``: exact FAISS ``IndexFlatL2`` on CPU (FAISS returns squared L2: square-rooted here).
- ``faiss_gpu``: ``IndexFlatL2`` on a GPU, only when the installed FAISS has GPU support and sees a
  GPU (the faiss-cpu wheel used here has none; the GPU machine has no FAISS).
- ``faiss_hnsw``: FAISS ``IndexHNSWFlat`` (a graph over the exact vectors). **Approximate**: the
  search walks the graph with a candidate list of ``ef_search`` entries and can miss the true
  nearest neighbour; the distances it returns are exact for the row it finds. On CPU it is the
  fast choice for LOCO-size banks (docs/PERFORMANCE.md has its recall and speed).
- ``faiss_ivfpq``: FAISS ``IndexIVFPQ`` for very large banks. **Approximate**: it searches only
  ``nprobe`` of ``nlist`` inverted lists, over product-quantised codes, so it can miss the true
  nearest neighbour and its distances are estimates from the codes.

Saving writes a folder: ``bank.npy`` (the exact float32 bank), ``index.json`` (``identity``) and,
for the approximate kinds, ``index.faiss`` (faiss.write_index). Exact indexes are rebuilt from the
bank on load: for a flat index the bank *is* the index, so this round-trips bit-exactly without
storing the vectors twice. Approximate indexes are written because rebuilding them need not
reproduce them (trained quantisers; a graph built by several threads).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels import knn_min
from kernels.knn_args import bank_sq_norms

__all__ = [
    "INDEX_KINDS",
    "SAVED_KINDS",
    "KnnIndex",
    "faiss_available",
    "faiss_gpu_available",
    "make_index",
    "restore_index",
    "saved_params",
]

INDEX_KINDS = ("auto", "torch", "faiss_flat", "faiss_gpu", "faiss_hnsw", "faiss_ivfpq")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_available() -> bool:
    """Whether FAISS is installed with GPU support and sees at least one GPU."""
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


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
    """Base class: ``add(bank)``, ``search(queries, k) -> (dist, idx)``, ``save``/``load``.

    ``search`` takes (Q, D) queries and returns (Q, k) float32 Euclidean distances, ascending, and
    (Q, k) int64 bank row indices, on the device of ``queries``.
    """

    kind: str = ""

    def __init__(self) -> None:
        self.bank: torch.Tensor | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """What the manifest records about this index."""
        size, dim = (0, 0) if self.bank is None else tuple(self.bank.shape)
        return {"kind": self.kind, "size": size, "dim": dim, **self._params()}

    def _params(self) -> dict[str, Any]:
        return {}

    def add(self, bank: torch.Tensor) -> None:
        """Set the (M, D) bank (replacing any previous one); stored as float32."""
        self.bank = _check_bank(bank).detach().float().contiguous()
        self._build()

    def _build(self) -> None:
        raise NotImplementedError

    def _check_queries(self, queries: torch.Tensor, k: int) -> None:
        if self.bank is None:
            raise ValueError(f"{self.kind} index is empty: call add(bank) first")
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
        return self._search(queries, k)

    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write the index into folder ``path`` (created if missing)."""
        if self.bank is None:
            raise ValueError("cannot save an empty index")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "bank.npy", self.bank.cpu().numpy())
        (folder / "index.json").write_text(json.dumps(self.identity, indent=2, sort_keys=True))
        self._save_extra(folder)

    def _save_extra(self, folder: Path) -> None:
        return None

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> KnnIndex:
        """Read a folder written by :meth:`save`; the torch backend puts the bank on ``device``."""
        folder = Path(path)
        meta_path, bank_path = folder / "index.json", folder / "bank.npy"
        for required in (meta_path, bank_path):
            if not required.is_file():
                raise FileNotFoundError(f"kNN index file missing: {required}")
        try:
            meta = json.loads(meta_path.read_text())
            kind = meta["kind"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{meta_path} is not a valid index description: {error}") from error
        bank = torch.from_numpy(np.load(bank_path, allow_pickle=False))
        if tuple(bank.shape) != (meta.get("size"), meta.get("dim")):
            raise ValueError(f"{bank_path} has shape {tuple(bank.shape)}, {meta_path} says {meta}")
        if kind in SAVED_KINDS:
            index_file = folder / "index.faiss"
            if not index_file.is_file():
                raise FileNotFoundError(f"kNN index file missing: {index_file}")
            return restore_index(meta, bank.numpy(), index_file.read_bytes())
        index = make_index(kind, device=device)
        index.add(bank.to(device) if kind == "torch" else bank)
        return index


class TorchKnnIndex(KnnIndex):
    """Exact brute force through :func:`kernels.knn_min`, k = 1 only."""

    kind = "torch"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.bank_sq: torch.Tensor | None = None

    def _build(self) -> None:
        assert self.bank is not None
        self.bank = self.bank.to(self.device)
        self.bank_sq = bank_sq_norms(self.bank)

    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k != 1:
            raise RuntimeError("the torch kNN index supports k=1 only; use a faiss index for k > 1")
        assert self.bank is not None
        dist, idx = knn_min(queries.to(self.device), self.bank, bank_sq=self.bank_sq)
        return dist[:, None].to(queries.device), idx[:, None].to(queries.device)


class _FaissIndex(KnnIndex):
    """Shared FAISS search: numpy in, squared L2 out, converted to Euclidean torch tensors."""

    def __init__(self) -> None:
        super().__init__()
        if not faiss_available():
            raise RuntimeError(f"the {self.kind} kNN index needs faiss, which is not installed")
        self._index: Any = None

    # FAISS is a C++ call through host numpy: torch.compile must run it as it is (Dynamo cannot
    # trace SWIG pointers and would fail the frame's guards).
    @torch.compiler.disable
    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        d2, idx = self._index.search(q, k)
        dist = torch.from_numpy(np.sqrt(np.maximum(d2, 0.0)).astype(np.float32))
        return dist.to(queries.device), torch.from_numpy(idx.astype(np.int64)).to(queries.device)


class FaissFlatIndex(_FaissIndex):
    """Exact ``IndexFlatL2`` on CPU."""

    kind = "faiss_flat"

    def _build(self) -> None:
        import faiss

        assert self.bank is not None
        self.bank = self.bank.cpu()
        self._index = faiss.IndexFlatL2(self.bank.shape[1])
        self._index.add(self.bank.numpy())


class FaissGpuIndex(_FaissIndex):
    """Exact ``IndexFlatL2`` on GPU ``gpu``; needs a FAISS build with GPU support."""

    kind = "faiss_gpu"

    def __init__(self, gpu: int = 0) -> None:
        super().__init__()
        if not faiss_gpu_available():
            raise RuntimeError(
                "the faiss_gpu kNN index needs a FAISS build with GPU support and a visible GPU; "
                "this installation has none (use 'torch' for GPU search)"
            )
        self.gpu = gpu

    def _build(self) -> None:
        import faiss

        assert self.bank is not None
        self.bank = self.bank.cpu()
        self._resources = faiss.StandardGpuResources()
        self._index = faiss.GpuIndexFlatL2(self._resources, self.bank.shape[1])
        self._index.add(self.bank.numpy())


class _SavedFaissIndex(_FaissIndex):
    """An approximate FAISS index, saved as ``index.faiss`` (see the module docstring)."""

    faiss_type = ""  # the faiss class name a saved index must have
    param_names: tuple[str, ...] = ()  # its integer parameters, recorded in the identity

    def _params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names}

    def _configure(self) -> None:
        """Apply the search-time parameters to ``self._index``."""
        raise NotImplementedError

    def _save_extra(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self._index, str(folder / "index.faiss"))


def _positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class FaissHnswIndex(_SavedFaissIndex):
    """Approximate ``IndexHNSWFlat``: ``m`` graph links per vector, a candidate list of
    ``ef_construction`` entries while building and ``ef_search`` while searching (more = better
    recall, slower)."""

    kind = "faiss_hnsw"
    faiss_type = "IndexHNSWFlat"
    param_names = ("m", "ef_construction", "ef_search")

    def __init__(self, m: int = 32, ef_construction: int = 40, ef_search: int = 128) -> None:
        super().__init__()
        _positive_ints(m=m, ef_construction=ef_construction, ef_search=ef_search)
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search

    def _configure(self) -> None:
        self._index.hnsw.efSearch = self.ef_search

    def _build(self) -> None:
        import faiss

        assert self.bank is not None
        self.bank = self.bank.cpu()
        self._index = faiss.IndexHNSWFlat(self.bank.shape[1], self.m)
        self._index.hnsw.efConstruction = self.ef_construction
        self._index.add(self.bank.numpy())
        self._configure()


class FaissIvfPqIndex(_SavedFaissIndex):
    """Approximate ``IndexIVFPQ``: ``nlist`` coarse cells, ``m`` sub-quantisers of ``nbits`` bits.

    Training needs at least ``max(nlist, 2 ** nbits)`` bank rows (FAISS k-means) and ``m`` must
    divide the dimension. Search visits ``nprobe`` cells (more = better recall, slower).
    """

    kind = "faiss_ivfpq"
    faiss_type = "IndexIVFPQ"
    param_names = ("nlist", "m", "nbits", "nprobe")

    def __init__(self, nlist: int = 1024, m: int = 64, nbits: int = 8, nprobe: int = 16) -> None:
        super().__init__()
        _positive_ints(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe)
        self.nlist, self.m, self.nbits, self.nprobe = nlist, m, nbits, nprobe

    def _configure(self) -> None:
        self._index.nprobe = self.nprobe

    def _build(self) -> None:
        import faiss

        assert self.bank is not None
        self.bank = self.bank.cpu()
        n, d = self.bank.shape
        if d % self.m:
            raise ValueError(f"IVF-PQ m={self.m} must divide the feature dim {d}")
        if n < max(self.nlist, 2**self.nbits):
            raise ValueError(
                f"IVF-PQ with nlist={self.nlist}, nbits={self.nbits} needs at least "
                f"{max(self.nlist, 2**self.nbits)} bank rows to train, got {n}"
            )
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFPQ(quantizer, d, self.nlist, self.m, self.nbits)
        vectors = self.bank.numpy()
        index.train(vectors)
        index.add(vectors)
        self._quantizer, self._index = quantizer, index
        self._configure()


_SAVED_CLASSES: dict[str, type[_SavedFaissIndex]] = {
    cls.kind: cls for cls in (FaissHnswIndex, FaissIvfPqIndex)
}
SAVED_KINDS = tuple(_SAVED_CLASSES)  # approximate: their FAISS index is saved with the bank


def restore_index(identity: dict[str, Any], bank: np.ndarray, raw: bytes) -> KnnIndex:
    """The saved approximate index described by ``identity``, from its (M, D) float32 bank and
    serialised FAISS bytes; ValueError when the bytes are not such an index of that bank."""
    import faiss

    kind = identity.get("kind")
    if kind not in SAVED_KINDS:
        raise ValueError(f"{kind!r} is not a saved kNN index kind {SAVED_KINDS}")
    cls = _SAVED_CLASSES[kind]
    index = cls(**{name: identity[name] for name in cls.param_names})
    searcher = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    if type(searcher).__name__ != cls.faiss_type or (searcher.ntotal, searcher.d) != bank.shape:
        raise ValueError(f"index.faiss is not a {cls.faiss_type} of the {bank.shape} bank")
    index.bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    index._index = searcher
    index._configure()
    return index


def saved_params(kind: str) -> tuple[str, ...]:
    """The integer parameters a saved (approximate) index of ``kind`` records in its identity."""
    return _SAVED_CLASSES[kind].param_names


def make_index(kind: str = "auto", device: str | torch.device = "cpu", **params: Any) -> KnnIndex:
    """An empty index of ``kind`` (see :data:`INDEX_KINDS`).

    ``auto``: ``torch`` when ``device`` is CUDA (no FAISS GPU build here), ``faiss_flat`` on CPU
    when faiss imports, else ``torch``. ``params`` go to the HNSW index (m, ef_construction,
    ef_search), the IVF-PQ index (nlist, m, nbits, nprobe) or the GPU index (gpu).
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown kNN index kind {kind!r}; expected one of {INDEX_KINDS}")
    device = torch.device(device)
    if kind == "auto":
        kind = "torch" if device.type == "cuda" or not faiss_available() else "faiss_flat"
    if kind not in (*SAVED_KINDS, "faiss_gpu") and params:
        raise ValueError(f"the {kind} index takes no parameters, got {sorted(params)}")
    if kind == "torch":
        return TorchKnnIndex(device)
    if kind == "faiss_flat":
        return FaissFlatIndex()
    if kind == "faiss_gpu":
        return FaissGpuIndex(**params)
    return _SAVED_CLASSES[kind](**params)
