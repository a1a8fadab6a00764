"""kNN index backends: agreement with brute force, IVF-PQ recall, save/load, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.models.knn_index import (
    FaissFlatIndex,
    KnnIndex,
    TorchKnnIndex,
    faiss_available,
    faiss_gpu_available,
    make_index,
    restore_index,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def data(
    m: int = 500, q: int = 200, d: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g), torch.randn(q, d, generator=g)


def exact_nearest(bank: torch.Tensor, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy brute force: Euclidean distance and index of the nearest bank row."""
    dist = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    best = dist.min(1)
    return best.values.numpy(), best.indices.numpy()


@pytest.mark.parametrize("kind", ["torch", pytest.param("faiss_flat", marks=needs_faiss)])
def test_exact_backends_match_brute_force(kind: str) -> None:
    bank, queries = data()
    index = make_index(kind)
    index.add(bank)
    dist, idx = index.search(queries, k=1)
    assert dist.shape == (200, 1) and dist.dtype == torch.float32
    assert idx.shape == (200, 1) and idx.dtype == torch.int64
    want_dist, want_idx = exact_nearest(bank, queries)
    # float32 accumulation over D=32 of values ~N(0, 2): 1e-4 relative / absolute on L2.
    np.testing.assert_allclose(dist[:, 0].numpy(), want_dist, rtol=1e-4, atol=1e-4)
    assert (idx[:, 0].numpy() == want_idx).all()


@needs_faiss
def test_faiss_and_torch_agree_and_return_euclidean() -> None:
    bank, queries = data(m=2000, q=300, d=64, seed=1)
    torch_index, faiss_index = make_index("torch"), make_index("faiss_flat")
    torch_index.add(bank)
    faiss_index.add(bank)
    d_t, i_t = torch_index.search(queries)
    d_f, i_f = faiss_index.search(queries)
    torch.testing.assert_close(d_t, d_f, rtol=1e-4, atol=1e-4)
    # Compare indices only where the two best distances are not (nearly) tied.
    top2 = torch.cdist(queries.double(), bank.double()).topk(2, largest=False).values
    untied = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert untied.sum() > 250
    assert torch.equal(i_t[untied], i_f[untied])
    # Euclidean, not squared: a known offset.
    offset = bank[:3] + torch.tensor([3.0] + [0.0] * 63)
    torch.testing.assert_close(
        faiss_index.search(offset)[0][:, 0], torch.full((3,), 3.0), rtol=1e-4, atol=1e-4
    )


@needs_faiss
def test_faiss_flat_k_greater_than_one_sorted() -> None:
    bank, queries = data()
    index = make_index("faiss_flat")
    index.add(bank)
    dist, _ = index.search(queries, k=5)
    assert dist.shape == (200, 5)
    assert (dist[:, 1:] >= dist[:, :-1]).all()
    want = torch.cdist(queries.double(), bank.double()).topk(5, largest=False).values
    torch.testing.assert_close(dist.double(), want, rtol=1e-4, atol=1e-4)


def clustered(seed: int, rows: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, 32) bank around 64 centres, and 500 queries: its first rows plus ``noise``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, 32, generator=g) * 4
    bank = centers[torch.randint(0, 64, (rows,), generator=g)] + torch.randn(rows, 32, generator=g)
    return bank, bank[:500] + noise * torch.randn(500, 32, generator=g)


@pytest.mark.slow
@needs_faiss
def test_ivfpq_recall_on_clustered_data() -> None:
    bank, queries = clustered(seed=2, rows=8000, noise=0.05)
    index = make_index("faiss_ivfpq", nlist=32, m=8, nbits=6, nprobe=8)
    index.add(bank)
    _, idx = index.search(queries, k=1)
    _, want = exact_nearest(bank, queries)
    recall = float((idx[:, 0].numpy() == want).mean())
    # Approximate by design: most, not all, true nearest neighbours are found.
    assert recall >= 0.8, recall
    assert index.identity == {
        "kind": "faiss_ivfpq",
        "size": 8000,
        "dim": 32,
        "nlist": 32,
        "m": 8,
        "nbits": 6,
        "nprobe": 8,
    }


@needs_faiss
def test_hnsw_recall_and_exact_distances_on_clustered_data() -> None:
    bank, queries = clustered(seed=4, rows=4000, noise=0.3)
    index = make_index("faiss_hnsw", m=16, ef_search=16)
    index.add(bank)
    dist, idx = index.search(queries, k=1)
    want_dist, want = exact_nearest(bank, queries)
    recall = float((idx[:, 0].numpy() == want).mean())
    assert recall >= 0.95, recall  # approximate by design
    # The distance returned is the exact distance to the row found, never below the true minimum.
    found = (queries - bank[idx[:, 0]]).norm(dim=1)
    torch.testing.assert_close(dist[:, 0], found, rtol=1e-4, atol=1e-4)
    assert (dist[:, 0].double() >= torch.as_tensor(want_dist) - 1e-4).all()
    assert index.identity == {
        "kind": "faiss_hnsw", "size": 4000, "dim": 32, "m": 16, "ef_construction": 40,
        "ef_search": 16,
    }  # fmt: skip


@needs_faiss
def test_restore_refuses_bytes_of_another_index() -> None:
    bank, _ = data(m=300, d=16)
    flat = make_index("faiss_flat")
    flat.add(bank)
    import faiss

    raw = faiss.serialize_index(flat._index).tobytes()
    identity = {"kind": "faiss_hnsw", "m": 8, "ef_construction": 40, "ef_search": 8}
    with pytest.raises(ValueError, match="not a IndexHNSWFlat"):
        restore_index(identity, bank.numpy(), raw)
    with pytest.raises(ValueError, match="not a saved kNN index kind"):
        restore_index({"kind": "faiss_flat"}, bank.numpy(), raw)


@pytest.mark.parametrize(
    "kind, params",
    [
        ("torch", {}),
        pytest.param("faiss_flat", {}, marks=needs_faiss),
        pytest.param(
            "faiss_ivfpq", {"nlist": 16, "m": 8, "nbits": 4, "nprobe": 4}, marks=needs_faiss
        ),
        pytest.param("faiss_hnsw", {"m": 8, "ef_search": 8}, marks=needs_faiss),
    ],
)
def test_save_load_round_trip(tmp_path: Path, kind: str, params: dict) -> None:
    bank, queries = data(m=600, d=16)
    index = make_index(kind, **params)
    index.add(bank)
    index.save(tmp_path / "idx")
    loaded = KnnIndex.load(tmp_path / "idx")
    assert type(loaded) is type(index)
    assert loaded.identity == index.identity
    assert loaded.bank is not None and torch.equal(loaded.bank, bank)
    for a, b in zip(index.search(queries), loaded.search(queries), strict=True):
        assert torch.equal(a, b)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        KnnIndex.load(tmp_path)
    index = make_index("torch")
    index.add(torch.randn(10, 4))
    index.save(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"index\.json"):
        KnnIndex.load(tmp_path)
    (tmp_path / "index.json").write_text('{"kind": "torch", "size": 11, "dim": 4}')
    with pytest.raises(ValueError, match=r"bank\.npy"):
        KnnIndex.load(tmp_path)


def test_auto_choice() -> None:
    assert isinstance(
        make_index("auto", device="cpu"), FaissFlatIndex if faiss_available() else TorchKnnIndex
    )
    assert isinstance(make_index("auto", device="cuda"), TorchKnnIndex)


@pytest.mark.skipif(not faiss_gpu_available(), reason="no FAISS GPU build or no GPU here")
def test_faiss_gpu_matches_flat() -> None:
    bank, queries = data()
    gpu, cpu = make_index("faiss_gpu"), make_index("faiss_flat")
    gpu.add(bank)
    cpu.add(bank)
    torch.testing.assert_close(gpu.search(queries)[0], cpu.search(queries)[0], rtol=1e-4, atol=1e-4)


def test_faiss_gpu_unavailable_is_runtime_error() -> None:
    if faiss_gpu_available():
        pytest.skip("this machine has FAISS GPU support")
    with pytest.raises(RuntimeError, match="GPU"):
        make_index("faiss_gpu")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown kNN index kind"):
        make_index("hnsw")
    with pytest.raises(ValueError, match="no parameters"):
        make_index("torch", nlist=4)
    index = make_index("torch")
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(3, 4))
    for bad in (
        torch.randn(0, 4),
        torch.randn(4),
        torch.ones(3, 4, dtype=torch.int64),
        torch.full((3, 4), float("nan")),
    ):
        with pytest.raises(ValueError):
            index.add(bad)
    index.add(torch.randn(10, 4))
    with pytest.raises(ValueError, match="dim"):
        index.search(torch.randn(3, 5))
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.randn(3, 4), k=0)
    with pytest.raises(RuntimeError, match="k=1 only"):
        index.search(torch.randn(3, 4), k=2)
    with pytest.raises(ValueError, match="save an empty"):
        make_index("torch").save("unused")


@needs_faiss
def test_ivfpq_bad_parameters() -> None:
    with pytest.raises(ValueError, match="divide"):
        make_index("faiss_ivfpq", nlist=4, m=5, nbits=4).add(torch.randn(100, 16))
    with pytest.raises(ValueError, match="at least"):
        make_index("faiss_ivfpq", nlist=64, m=4, nbits=8).add(torch.randn(100, 16))
    with pytest.raises(ValueError, match="nprobe"):
        make_index("faiss_ivfpq", nprobe=0)
