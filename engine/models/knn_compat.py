"""What earlier versions wrote about the kNN index: the index names they took for
``structural.index`` and the index records (``structural_index``, ``index.json``) they saved,
read in this version's terms (FAISS factory strings, :attr:`KnnIndex.identity` form)."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["OLD_NAMES", "upgrade_identity", "upgrade_spec"]

log = logging.getLogger(__name__)

OLD_NAMES = {"faiss_flat": "Flat", "faiss_hnsw": "HNSW32", "faiss_ivfpq": "IVF1024,PQ64"}


def upgrade_spec(spec: str) -> str:
    """The factory string for an index name of earlier versions (said in the log), else ``spec``."""
    if spec not in OLD_NAMES:
        return spec
    log.info("structural.index=%r is the old name of the FAISS index %r", spec, OLD_NAMES[spec])
    return OLD_NAMES[spec]


def upgrade_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """An identity in this version's form; one of an earlier version (``kind`` faiss_flat,
    faiss_gpu, faiss_hnsw or faiss_ivfpq) converted, with a log line. KeyError when a field of
    the old form is missing, ValueError for an unknown kind."""
    kind = identity.get("kind")
    if kind in ("torch", "faiss"):
        return identity
    if kind in ("faiss_flat", "faiss_gpu"):
        spec, params, exact = "Flat", "", True
    elif kind == "faiss_hnsw":
        spec, params, exact = f"HNSW{identity['m']}", f"efSearch={identity['ef_search']}", False
    elif kind == "faiss_ivfpq":
        spec = f"IVF{identity['nlist']},PQ{identity['m']}x{identity['nbits']}"
        params, exact = f"nprobe={identity['nprobe']}", False
    else:
        raise ValueError(f"unknown kNN index kind {kind!r}")
    shown = params or "no parameters"
    log.info("kNN index %r of an earlier version read as FAISS %r (%s)", kind, spec, shown)
    size, dim = identity.get("size"), identity.get("dim")
    return {
        "kind": "faiss",
        "spec": spec,
        "params": params,
        "exact": exact,
        "size": size,
        "dim": dim,
    }
