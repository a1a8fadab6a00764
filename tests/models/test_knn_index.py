"""kNN index search: exact specs against brute force, approximate recall, Euclidean distances
whatever the index, exactness derived from FAISS, and bad settings."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine.models import knn_index
from engine.models.knn_index import (
    AUTO_APPROXIMATE_ROWS,
    KnnIndex,
    auto_faiss_spec,
    auto_faiss_specs,
    auto_index,
    auto_index_params,
    check_index_setting,
    faiss_available,
    faiss_gpu_available,
    make_index,
    parse_params,
)
from engine.models.structural import StructuralConfig

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def data(
    m: int = 500, q: int = 200, d: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g), torch.randn(q, d, generator=g)


def exact_nearest(bank: torch.Tensor, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 brute force: Euclidean distance and index of the nearest bank row."""
    dist = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    best = dist.min(1)
    return best.values.numpy(), best.indices.numpy()


def built(spec: str, bank: torch.Tensor, params: str = "") -> KnnIndex:
    index = make_index(spec, params=params)
    index.add(bank)
    return index


@pytest.mark.parametrize("spec", ["torch", pytest.param("Flat", marks=needs_faiss)])
def test_exact_specs_match_brute_force(spec: str) -> None:
    bank, queries = data()
    dist, idx = built(spec, bank).search(queries, k=1)
    assert dist.shape == (200, 1) and dist.dtype == torch.float32
    assert idx.shape == (200, 1) and idx.dtype == torch.int64
    want_dist, want_idx = exact_nearest(bank, queries)
    # float32 accumulation over D=32 of values ~N(0, 2): 1e-4 relative / absolute on L2.
    np.testing.assert_allclose(dist[:, 0].numpy(), want_dist, rtol=1e-4, atol=1e-4)
    assert (idx[:, 0].numpy() == want_idx).all()


@needs_faiss
@pytest.mark.parametrize("spec", ["Flat", "faiss_flat", "auto"])
def test_exact_faiss_specs_agree_with_torch(spec: str) -> None:
    bank, queries = data(m=2000, q=300, d=64, seed=1)
    index = built(spec, bank)
    assert index.spec == "Flat" and index.exact
    d_t, i_t = built("torch", bank).search(queries)
    d_f, i_f = index.search(queries)
    torch.testing.assert_close(d_f, d_t, rtol=1e-4, atol=0)
    # Compare indices only where the two best distances are not (nearly) tied.
    top2 = torch.cdist(queries.double(), bank.double()).topk(2, largest=False).values
    untied = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert untied.sum() > 250
    assert torch.equal(i_t[untied], i_f[untied])
    # Euclidean, not squared: a known offset.
    offset = bank[:3] + torch.tensor([3.0] + [0.0] * 63)
    torch.testing.assert_close(
        index.search(offset)[0][:, 0], torch.full((3,), 3.0), rtol=1e-4, atol=1e-4
    )


@needs_faiss
def test_faiss_flat_k_greater_than_one_sorted() -> None:
    bank, queries = data()
    dist, _ = built("Flat", bank).search(queries, k=5)
    assert dist.shape == (200, 5)
    assert (dist[:, 1:] >= dist[:, :-1]).all()
    want = torch.cdist(queries.double(), bank.double()).topk(5, largest=False).values
    torch.testing.assert_close(dist.double(), want, rtol=1e-4, atol=1e-4)


@needs_faiss
@pytest.mark.parametrize("params", ["", "efSearch=128"])
def test_hnsw_recall_with_ef_search_128(params: str) -> None:
    """HNSW32 searches with efSearch=128 by default (FAISS's own default is 16)."""
    bank, queries = data(m=4000, q=500, d=32, seed=4)
    index = built("HNSW32", bank, params)
    assert not index.exact and index.identity["params"] == "efSearch=128"
    dist, idx = index.search(queries, k=1)
    want_dist, want = exact_nearest(bank, queries)
    recall = float((idx[:, 0].numpy() == want).mean())
    assert recall >= 0.95, recall  # approximate by design
    # The distance returned is the exact distance to the row found, never below the true minimum.
    found = (queries - bank[idx[:, 0]]).norm(dim=1)
    torch.testing.assert_close(dist[:, 0], found, rtol=1e-5, atol=1e-5)
    assert (dist[:, 0].double() >= torch.as_tensor(want_dist) - 1e-4).all()


@pytest.mark.slow
@needs_faiss
def test_ivfpq_recall_on_clustered_data() -> None:
    """A (8000, 32) bank around 64 centres; queries: its first rows plus a little noise."""
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(64, 32, generator=g) * 4
    bank = centers[torch.randint(0, 64, (8000,), generator=g)] + torch.randn(8000, 32, generator=g)
    queries = bank[:500] + 0.05 * torch.randn(500, 32, generator=g)
    index = built("IVF32,PQ8x6", bank, "nprobe=8")
    _, idx = index.search(queries, k=1)
    _, want = exact_nearest(bank, queries)
    recall = float((idx[:, 0].numpy() == want).mean())
    assert recall >= 0.8, recall  # approximate by design: most, not all, are found
    assert index.identity == {
        "kind": "faiss", "spec": "IVF32,PQ8x6", "params": "nprobe=8", "exact": False,
        "size": 8000, "dim": 32,
    }  # fmt: skip


@needs_faiss
def test_compressed_codes_still_give_exact_distances_of_the_rows_found() -> None:
    """PQ estimates distances from its codes: the index recomputes them from the bank."""
    bank, queries = data(m=400, q=100, d=16, seed=5)
    index = built("IVF8,PQ4x4", bank, "nprobe=8")
    dist, idx = index.search(queries, k=3)
    found = (queries[:, None, :] - bank[idx]).norm(dim=-1)
    torch.testing.assert_close(dist, found, rtol=1e-5, atol=1e-5)
    assert (dist[:, 1:] >= dist[:, :-1]).all()


@needs_faiss
def test_rows_an_ivf_probe_misses_are_found_by_exact_search() -> None:
    """IVF returns -1 where the probed lists hold fewer than k rows: never a wrong row."""
    bank, queries = data(m=200, q=50, d=8, seed=6)
    index = built("IVF16,Flat", bank, "nprobe=1")
    short = torch.from_numpy(index._faiss.search(queries.numpy(), 40)[1] < 0).any(dim=1)
    assert short.any()
    dist, idx = index.search(queries, k=40)
    assert (idx >= 0).all() and torch.isfinite(dist).all()
    want = torch.cdist(queries.double(), bank.double()).topk(40, largest=False).values
    torch.testing.assert_close(dist[short].double(), want[short], rtol=1e-5, atol=1e-5)


@needs_faiss
@pytest.mark.parametrize(
    ("spec", "exact"),
    [("Flat", True), ("HNSW16", False), ("IVF4,Flat", False), ("PQ4x4", False), ("SQ8", False)],
)
def test_exactness_is_derived_from_the_faiss_index(spec: str, exact: bool) -> None:
    index = built(spec, data(m=300, d=16)[0])
    assert index.exact is exact and index.identity["exact"] is exact


@needs_faiss
def test_defaults_apply_only_where_the_index_has_them() -> None:
    bank = data(m=300, d=16)[0]
    assert built("Flat", bank).identity["params"] == ""
    assert built("IVF4,Flat", bank).identity["params"] == "nprobe=16"
    assert built("IVF4,Flat", bank, "nprobe=2").identity["params"] == "nprobe=2"
    assert built("HNSW8", bank, "efSearch=32").identity["params"] == "efSearch=32"


@needs_faiss
def test_too_few_bank_rows_to_train_is_a_clear_error() -> None:
    index = make_index("IVF1024,Flat")
    with pytest.raises(ValueError, match=r"structural.index='IVF1024,Flat'.*100-row"):
        index.add(data(m=100, d=16)[0])
    with pytest.raises(ValueError, match="empty"):  # left as it was, not half built
        index.search(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"structural.index='IVF4,PQ4'.*100-row"):
        built("IVF4,PQ4", data(m=100, d=16)[0])  # 8-bit codes: 256 centroids


@needs_faiss
@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("bogus", "", r"structural.index='bogus' is not a FAISS index factory string"),
        ("IVF1024,", "", r"structural.index='IVF1024,' is not a FAISS"),
        ("HNSW0", "", r"structural.index='HNSW0': a size of 0"),
        ("", "", r"structural.index='': empty"),
        ("HNSW32", "efSearch", r"structural.index_params='efSearch'"),
        ("HNSW32", "efSearch=0", r"structural.index_params='efSearch=0'"),
        ("HNSW32", "efSearch=-3", r"structural.index_params='efSearch=-3'"),
        ("HNSW32", "efSearch=1,=2", r"structural.index_params='efSearch=1,=2'"),
    ],
)
def test_bad_settings_fail_at_config_validation(spec: str, params: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuralConfig(index=spec, index_params=params)


@needs_faiss
@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("IVF64,PQ64", "", r"structural.index='IVF64,PQ64' cannot index the 152-d"),
        ("HNSW32", "nprobe=4", r"structural.index_params: nprobe=4 does not apply"),
        ("Flat", "efSearch=64", r"structural.index_params: efSearch=64 does not apply"),
        ("auto", "nprobe=4", r"structural.index='auto' takes no parameters.*name the index"),
        ("torch", "nprobe=4", r"structural.index='torch' takes no parameters"),
    ],
)
def test_settings_that_do_not_fit_the_features_fail_with_their_dimension(
    spec: str, params: str, message: str
) -> None:
    """What depends on the features' dimension or on both settings together is checked when
    it is known (StructuralModel.from_config, before training)."""
    StructuralConfig(index=spec, index_params=params)  # each setting is well spelt
    with pytest.raises(ValueError, match=message):
        check_index_setting(spec, params, 152)


@needs_faiss
def test_a_spec_that_fits_only_the_true_dimension_is_not_refused_early() -> None:
    """PQ19 does not divide the configured 1024 but divides the compact 152-d features."""
    StructuralConfig(index="PQ19x4", feature_dim=1024)
    check_index_setting("PQ19x4", "", 152)
    with pytest.raises(ValueError, match="cannot index the 1024-d"):
        check_index_setting("PQ19x4", "", 1024)


def test_parse_params() -> None:
    assert parse_params("") == {}
    assert parse_params(" efSearch = 64 , nprobe=8,efSearch=32") == {"efSearch": 32, "nprobe": 8}


@needs_faiss
@pytest.mark.parametrize(
    ("old", "spec"),
    [("faiss_flat", "Flat"), ("faiss_hnsw", "HNSW32"), ("faiss_ivfpq", "IVF1024,PQ64")],
)
def test_old_names_are_read_as_factory_strings(old: str, spec: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="engine.models.knn_compat"):
        assert StructuralConfig(index=old).index == spec
        assert make_index(old).spec == spec
    assert f"structural.index='{old}' is the old name of the FAISS index '{spec}'" in caplog.text


@needs_faiss
def test_old_hnsw_name_keeps_its_search_settings() -> None:
    index = built("faiss_hnsw", data(m=300, d=16)[0])
    assert index.identity["params"] == "efSearch=128"
    assert index._faiss.hnsw.efConstruction == 40 and index._faiss.hnsw.efSearch == 128


def test_auto_choice() -> None:
    assert make_index("auto", device="cpu").spec == ("Flat" if faiss_available() else "torch")
    assert make_index("auto", device="cuda").spec == "torch"


@pytest.mark.parametrize(
    ("rows", "dim", "spec"),
    [
        (None, None, "Flat"),
        (AUTO_APPROXIMATE_ROWS - 1, 152, "Flat"),
        (AUTO_APPROXIMATE_ROWS, 152, "IVF256,PQ76x4fs,RFlat"),  # sqrt(50 000) = 224
        (80_640, 152, "IVF256,PQ76x4fs,RFlat"),  # LOCO size, layer2 + layer3: 284
        (80_640, 176, "IVF256,PQ88x4fs,RFlat"),  # the same at the cpu preset (three levels)
        (400_000, 1024, "IVF512,PQ512x4fs,RFlat"),  # 632
        (2_000_000, 151, "IVF1024,PQ151x4fs,RFlat"),  # 1 414; an odd dimension: 1-d codes
    ],
)
def test_auto_picks_product_codes_for_large_banks_on_cpu(
    rows: int | None, dim: int | None, spec: str
) -> None:
    assert auto_faiss_spec(rows, dim) == spec
    assert auto_index("cpu", rows, dim) == (spec if faiss_available() else "torch")
    assert auto_index("cuda", rows, dim) == "torch"  # exact search on the GPU, whatever the size


def test_auto_probes_fewer_lists_only_in_its_own_approximate_pick() -> None:
    assert auto_index_params(auto_faiss_spec(AUTO_APPROXIMATE_ROWS, 152)) == "nprobe=8"
    assert auto_index_params("Flat") == auto_index_params("torch") == ""


def test_auto_for_a_large_bank_needs_its_dimension() -> None:
    with pytest.raises(ValueError, match="dimension of the 50000-row bank"):
        auto_faiss_spec(AUTO_APPROXIMATE_ROWS)


def test_auto_specs_of_earlier_versions() -> None:
    """Artifacts built before keep loading: ``auto`` picked IVF{4 sqrt(rows)},Flat then."""
    assert auto_faiss_specs(80_640, 152) == ("IVF256,PQ76x4fs,RFlat", "IVF1024,Flat")
    assert auto_faiss_specs(100, 152) == ("Flat",)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_auto_index_for_a_large_bank_finds_the_nearest_rows() -> None:
    """The codes only pick candidates; the k_factor_rf=16 best are re-ranked exactly, so on a
    clustered bank the refined search finds the true nearest row for nearly every query."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 32, generator=gen) * 4
    bank = centres[torch.randint(0, 64, (8_192,), generator=gen)] + torch.randn(
        8_192, 32, generator=gen
    )
    queries = bank[:500] + 0.3 * torch.randn(500, 32, generator=gen)
    index = built(auto_faiss_spec(AUTO_APPROXIMATE_ROWS, 32), bank)
    assert index.identity["params"] == "nprobe=16,k_factor_rf=16"
    assert index.exact is False
    dist, idx = index.search(queries, 1)
    want_dist, want_idx = built("Flat", bank).search(queries, 1)
    assert (idx == want_idx).float().mean() >= 0.98
    torch.testing.assert_close(dist[idx == want_idx], want_dist[idx == want_idx])


def test_auto_without_faiss_is_exact_torch_search(monkeypatch) -> None:
    monkeypatch.setattr(knn_index, "faiss_available", lambda: False)
    assert auto_index("cpu", 10 * AUTO_APPROXIMATE_ROWS) == "torch"
    assert make_index("auto", device="cpu").spec == "torch"


@pytest.mark.skipif(not faiss_gpu_available(), reason="no FAISS GPU build or no GPU here")
def test_faiss_gpu_matches_flat() -> None:
    bank, queries = data()
    gpu, cpu = built("faiss_gpu", bank), built("Flat", bank)
    torch.testing.assert_close(gpu.search(queries)[0], cpu.search(queries)[0], rtol=1e-4, atol=1e-4)


def test_faiss_gpu_unavailable_is_runtime_error() -> None:
    if faiss_gpu_available():
        pytest.skip("this machine has FAISS GPU support")
    with pytest.raises(RuntimeError, match="GPU"):
        make_index("faiss_gpu")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="takes none"):
        make_index("torch", params="nprobe=4")
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
