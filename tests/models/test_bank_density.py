"""Memory-bank density weights (structural.density_k): spacing, scales, scores, state dict."""

from __future__ import annotations

import io

import pytest
import torch

from engine.models.backbones import load_backbone
from engine.models.bank_density import MIN_SPACING, kth_neighbour_distances, row_scales
from engine.models.knn_index import KnnIndex, faiss_available
from engine.models.structural import PatchFeatures, StructuralConfig, StructuralModel


def test_kth_neighbour_distances_against_cdist() -> None:
    torch.manual_seed(0)
    bank = torch.randn(37, 5)
    d = torch.cdist(bank, bank)
    d.fill_diagonal_(torch.inf)
    for k in (1, 3, 36):
        want = d.sort(dim=1).values[:, k - 1]
        got = kth_neighbour_distances(bank, k, chunk=8)  # several blocks, a ragged last one
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_kth_neighbour_distances_by_hand() -> None:
    bank = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(kth_neighbour_distances(bank, 1), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(kth_neighbour_distances(bank, 2), torch.tensor([3.0, 2.0, 3.0, 6.0]))


def test_row_scales_median_over_spacing_with_floor() -> None:
    # spacings to the nearest other row: 1, 1, 1, 1 (pairs) and 0 for the duplicate pair
    bank = torch.tensor([[0.0], [1.0], [10.0], [11.0], [20.0], [20.0], [30.0]])
    spacing = kth_neighbour_distances(bank, 1)
    median = spacing.median()
    want = median / spacing.clamp_min(MIN_SPACING * median)
    got = row_scales(bank, 1)
    torch.testing.assert_close(got, want)
    assert got[4] == got[5] == pytest.approx(1 / MIN_SPACING)  # duplicates: floored, finite
    assert got[0] == pytest.approx(1.0)  # a row at the median spacing keeps its distances


@pytest.mark.parametrize(
    "bank, k, match",
    [
        (torch.zeros(1, 3), 1, "M >= 2"),
        (torch.randn(4, 3), 4, "k must be"),
        (torch.randn(4, 3), 0, "k must be"),
        (torch.zeros(6, 3), 2, "duplicates"),
    ],
)
def test_bad_banks_and_k(bank: torch.Tensor, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        row_scales(bank, k)


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_config_refuses_bad_density_k(value: object) -> None:
    with pytest.raises(ValueError, match="density_k"):
        StructuralConfig(density_k=value)


@pytest.fixture(scope="module")
def features() -> PatchFeatures:
    torch.manual_seed(0)
    backbone = load_backbone(
        "resnet18", ("layer2", "layer3"), weights="random", allow_random=True, verbose=False
    )
    return PatchFeatures(backbone, feature_dim=32).eval()


def _plain_scores(bank: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(queries, bank)
    return d.min(dim=1)


@pytest.mark.parametrize("search", ["bank", "torch index", "faiss index"])
def test_scores_are_distance_times_the_nearest_rows_scale(
    features: PatchFeatures, search: str
) -> None:
    if search == "faiss index" and not faiss_available():
        pytest.skip("faiss is not installed")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f, grid = features(x)
    rows = f.reshape(-1, f.shape[-1])[::3]
    bank = rows + 0.05 * torch.randn_like(rows)
    model = StructuralModel(features, bank, density_k=3).eval()
    if search != "bank":
        index = KnnIndex("torch" if search == "torch index" else "Flat")
        index.add(bank)
        model.use_index(index)
    with torch.no_grad():
        got = model.score_features(f, grid)
    dist, idx = _plain_scores(bank, f.reshape(-1, f.shape[-1]))
    want = (dist * row_scales(bank, 3)[idx]).reshape(2, *grid)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = StructuralModel(features, bank).eval()
    with torch.no_grad():
        assert not torch.allclose(plain.score_features(f, grid), got)


def test_state_dict_round_trip_and_old_state(features: PatchFeatures) -> None:
    torch.manual_seed(2)
    bank = torch.randn(30, features.out_dim)
    model = StructuralModel(features, bank, density_k=2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    loaded = StructuralModel(features, density_k=2)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.row_scale, model.row_scale)
    # a state saved before the field existed loads into a model without density weights
    old = {k: v for k, v in state.items() if k != "row_scale"}
    plain = StructuralModel(features)
    plain.load_state_dict(old)
    assert plain.row_scale.numel() == 0
    with pytest.raises(ValueError, match="row_scale has 0 entries"):
        StructuralModel(features, density_k=2).load_state_dict(old)


def test_bank_too_small_for_k(features: PatchFeatures) -> None:
    with pytest.raises(ValueError, match="more than 5 rows"):
        StructuralModel(features, torch.randn(5, features.out_dim), density_k=5)
