"""kNN index save/load: faiss.write_index / read_index round trips, folders and identities of
earlier versions, and refused files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.models.knn_compat import upgrade_identity
from engine.models.knn_index import KnnIndex, faiss_available, make_index, restore_index

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def data(m: int = 600, q: int = 100, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, d, generator=g), torch.randn(q, d, generator=g)


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("torch", ""),
        pytest.param("Flat", "", marks=needs_faiss),
        pytest.param("HNSW8", "efSearch=16", marks=needs_faiss),
        pytest.param("IVF16,Flat", "nprobe=4", marks=needs_faiss),
        pytest.param("IVF16,PQ8x4", "nprobe=4", marks=needs_faiss),
    ],
)
def test_save_load_round_trip(tmp_path: Path, spec: str, params: str) -> None:
    bank, queries = data()
    index = make_index(spec, params=params)
    index.add(bank)
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "index.faiss").is_file() is not index.exact
    loaded = KnnIndex.load(tmp_path / "idx")
    assert loaded.identity == index.identity
    assert loaded.bank is not None and torch.equal(loaded.bank, bank)
    k = 1 if spec == "torch" else 5
    for a, b in zip(index.search(queries, k), loaded.search(queries, k), strict=True):
        assert torch.equal(a, b)


@needs_faiss
def test_search_parameters_are_restored_not_taken_from_the_file(tmp_path: Path) -> None:
    import faiss

    index = make_index("HNSW8", params="efSearch=24")
    index.add(data()[0])
    index.save(tmp_path)
    index._faiss.hnsw.efSearch = 3  # what the file holds does not decide the search
    faiss.write_index(index._faiss, str(tmp_path / "index.faiss"))
    assert KnnIndex.load(tmp_path)._faiss.hnsw.efSearch == 24


@needs_faiss
def test_restore_refuses_bytes_of_another_index() -> None:
    import faiss

    bank = data(m=300)[0]
    hnsw = make_index("HNSW8")
    hnsw.add(bank)
    flat = faiss.IndexFlatL2(16)
    flat.add(bank.numpy())
    raw = faiss.serialize_index(flat).tobytes()
    with pytest.raises(ValueError, match=r"not a IndexHNSWFlat \('HNSW8'\).*found a IndexFlat"):
        restore_index(hnsw.identity, bank.numpy(), raw)
    with pytest.raises(ValueError, match="300 x 16"):
        restore_index(hnsw.identity, bank[:200].numpy(), faiss.serialize_index(hnsw._faiss))
    exact = {**hnsw.identity, "spec": "Flat", "exact": True}
    with pytest.raises(ValueError, match="does not describe a saved"):
        restore_index(exact, bank.numpy(), raw)


def legacy_folder(folder: Path, bank: torch.Tensor, identity: dict, searcher=None) -> None:
    """A folder as the previous version's ``KnnIndex.save`` wrote it."""
    import faiss

    folder.mkdir()
    np.save(folder / "bank.npy", bank.numpy())
    (folder / "index.json").write_text(json.dumps(identity))
    if searcher is not None:
        faiss.write_index(searcher, str(folder / "index.faiss"))


@needs_faiss
def test_folders_of_the_previous_version_load(tmp_path: Path) -> None:
    import faiss

    bank, queries = data()
    hnsw = faiss.IndexHNSWFlat(16, 8)  # as the old FaissHnswIndex built it
    hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 40, 16
    hnsw.add(bank.numpy())
    old = {"kind": "faiss_hnsw", "size": 600, "dim": 16, "m": 8, "ef_construction": 40}
    legacy_folder(tmp_path / "hnsw", bank, {**old, "ef_search": 16}, hnsw)
    loaded = KnnIndex.load(tmp_path / "hnsw")
    assert (loaded.spec, loaded.identity["params"], loaded.exact) == ("HNSW8", "efSearch=16", False)
    _, want = hnsw.search(queries.numpy(), 1)
    assert (loaded.search(queries)[1].numpy() == want).all()

    quantizer = faiss.IndexFlatL2(16)
    ivfpq = faiss.IndexIVFPQ(quantizer, 16, 8, 4, 4)
    ivfpq.train(bank.numpy())
    ivfpq.add(bank.numpy())
    old = {"kind": "faiss_ivfpq", "size": 600, "dim": 16, "nlist": 8, "m": 4, "nbits": 4}
    legacy_folder(tmp_path / "ivfpq", bank, {**old, "nprobe": 3}, ivfpq)
    loaded = KnnIndex.load(tmp_path / "ivfpq")
    assert (loaded.spec, loaded.identity["params"]) == ("IVF8,PQ4x4", "nprobe=3")
    ivfpq.nprobe = 3
    _, want = ivfpq.search(queries.numpy(), 1)
    assert (loaded.search(queries)[1].numpy() == want).all()

    legacy_folder(tmp_path / "flat", bank, {"kind": "faiss_flat", "size": 600, "dim": 16})
    assert KnnIndex.load(tmp_path / "flat").identity["spec"] == "Flat"


def test_upgrade_identity() -> None:
    new = {"kind": "faiss", "spec": "HNSW32", "params": "", "exact": False, "size": 1, "dim": 2}
    assert upgrade_identity(new) is new
    assert upgrade_identity({"kind": "faiss_gpu", "size": 3, "dim": 4}) == {
        "kind": "faiss", "spec": "Flat", "params": "", "exact": True, "size": 3, "dim": 4
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown kNN index kind 'annoy'"):
        upgrade_identity({"kind": "annoy"})
    with pytest.raises(KeyError):
        upgrade_identity({"kind": "faiss_hnsw", "m": 32})


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        KnnIndex.load(tmp_path)
    index = make_index("torch")
    index.add(torch.randn(10, 4))
    index.save(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"index\.json"):
        KnnIndex.load(tmp_path)
    (tmp_path / "index.json").write_text('{"kind": "annoy"}')
    with pytest.raises(ValueError, match=r"index\.json is not a valid index description"):
        KnnIndex.load(tmp_path)
    (tmp_path / "index.json").write_text('{"kind": "torch", "size": 11, "dim": 4}')
    with pytest.raises(ValueError, match=r"bank\.npy"):
        KnnIndex.load(tmp_path)


@needs_faiss
def test_approximate_index_without_its_file_is_refused(tmp_path: Path) -> None:
    index = make_index("HNSW8")
    index.add(data()[0])
    index.save(tmp_path)
    (tmp_path / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.faiss"):
        KnnIndex.load(tmp_path)
