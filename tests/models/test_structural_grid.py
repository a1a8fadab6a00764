"""``StructuralConfig.grid_level``: patch features on a coarser level's grid, the finer levels
max-pooled onto it per backbone channel."""

from __future__ import annotations

import io
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.artifact import load_artifact, read_manifest
from engine.models.backbones import FeatureExtractor, load_backbone
from engine.models.structural import PatchFeatures, StructuralConfig, StructuralModel

tiny = runpy.run_path(str(Path(__file__).parents[1] / "reliability" / "tiny.py"))

LEVELS = ("layer1", "layer2", "layer3")


@pytest.fixture(scope="module")
def resnet18() -> FeatureExtractor:
    torch.manual_seed(0)
    return load_backbone("resnet18", LEVELS, weights="random", allow_random=True, verbose=False)


def test_features_follow_the_recipe_on_the_coarser_grid(resnet18: FeatureExtractor) -> None:
    """Independent computation: 3x3 average per level, layer1's channels max-pooled 2x2 onto the
    layer2 grid, layer3 upsampled, then PatchCore's channel poolings (PatchCore coordinates)."""
    pf = PatchFeatures(resnet18, feature_dim=64, compact=False, grid_level="layer2")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, (h, w) = pf(x)
        maps = resnet18(x)
    assert (h, w) == maps["layer2"].shape[-2:] == (8, 8)
    per_level = []
    for level in LEVELS:
        f = F.avg_pool2d(maps[level], 3, stride=1, padding=1)
        if level == "layer1":
            f = F.max_pool2d(f, 2)
        f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        f = f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])
        per_level.append(F.adaptive_avg_pool1d(f[:, None], 64)[:, 0])
    stacked = torch.stack(per_level, dim=1).reshape(-1, 1, 3 * 64)
    want = F.adaptive_avg_pool1d(stacked, 64)[:, 0].reshape(2, h * w, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compact_coordinates_keep_the_distances(resnet18: FeatureExtractor) -> None:
    """The pooling acts on backbone channels, before the projection: compact coordinates are
    still an isometry of PatchCore's, whatever basis the SVD returns."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, _ = PatchFeatures(resnet18, 64, compact=False, grid_level="layer2")(x)
        compact, _ = PatchFeatures(resnet18, 64, compact=True, grid_level="layer2")(x)
    torch.testing.assert_close(
        torch.cdist(compact[0], compact[1]), torch.cdist(full[0], full[1]), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("size", [(72, 100), (61, 45)])
def test_odd_sizes_land_on_the_grid_level(resnet18: FeatureExtractor, size) -> None:
    pf = PatchFeatures(resnet18, feature_dim=32, grid_level="layer2")
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        features, grid = pf(x)
        want = tuple(resnet18(x)["layer2"].shape[-2:])
    assert grid == want
    assert features.shape == (1, want[0] * want[1], pf.out_dim)
    assert torch.isfinite(features).all()


def test_default_is_the_finest_grid(resnet18: FeatureExtractor) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, grid = PatchFeatures(resnet18, feature_dim=32)(x)
        _, same = PatchFeatures(resnet18, feature_dim=32, grid_level="layer1")(x)
    assert grid == same == (16, 16)


def test_refuses_a_level_it_does_not_read(resnet18: FeatureExtractor) -> None:
    with pytest.raises(ValueError, match="grid_level"):
        PatchFeatures(resnet18, feature_dim=32, grid_level="layer4")
    with pytest.raises(ValueError, match="grid_level"):
        StructuralConfig(levels=("layer2", "layer3"), grid_level="layer1")
    assert StructuralConfig(levels=LEVELS, grid_level="layer2").grid_level == "layer2"


@pytest.mark.usefixtures("one_thread")
def test_artifact_round_trip(tmp_path: Path) -> None:
    detector, config = tiny["tiny_detector"](0, levels=("layer1", "layer2"), grid_level="layer2")
    assert detector.structural.patch_features.grid_level == "layer2"
    art = tiny["save"](tmp_path / "art", detector, config)
    assert read_manifest(art)["config"]["structural"]["grid_level"] == "layer2"
    loaded, _ = load_artifact(art)
    assert loaded.structural.patch_features.grid_level == "layer2"
    frames = torch.randint(0, 256, (2, 40, 50, 3), dtype=torch.uint8)
    with torch.no_grad():
        want, got = detector(frames), loaded(frames)
    torch.testing.assert_close(got.structural, want.structural)
    torch.testing.assert_close(got.fused, want.fused)


def test_onnx_export_matches_eager(resnet18: FeatureExtractor) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pf = PatchFeatures(resnet18, feature_dim=32, grid_level="layer2")
    model = StructuralModel(pf, torch.randn(50, pf.out_dim)).eval()
    x = torch.randn(1, 3, 72, 100)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    got = ort.InferenceSession(buffer.getvalue()).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_onnx_backend_equals_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends import apply_backend, onnx

    if not onnx.onnx_available():
        pytest.skip("onnxruntime not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    detector, _ = tiny["tiny_detector"](0, levels=("layer1", "layer2"), grid_level="layer2")
    frames = torch.randint(0, 256, (2, 40, 50, 3), dtype=torch.uint8)
    with torch.no_grad():
        eager = detector(frames)
    assert apply_backend(detector, "onnx") == "onnx"
    with torch.no_grad():
        got = detector(frames)
    for name in ("fused", "structural"):
        torch.testing.assert_close(getattr(got, name), getattr(eager, name), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compact", [True, False])
def test_layout_keeps_only_the_coarse_levels(resnet18: FeatureExtractor, compact: bool) -> None:
    """``layout`` recovers, from the features alone, the sum of the grid level's and the
    coarser levels' projections: what the composition branch reads."""
    pf = PatchFeatures(resnet18, feature_dim=1024, compact=compact, grid_level="layer2")
    assert pf.detail_levels == ("layer1",) and pf.layout_projection is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, grid = pf(x)
        maps = resnet18(x)
    want = 0
    for level in ("layer2", "layer3"):
        f = F.avg_pool2d(maps[level], 3, stride=1, padding=1)
        f = F.conv2d(f, getattr(pf, f"projection_{level}"))
        want = want + F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
    want = want.flatten(2).transpose(1, 2)
    torch.testing.assert_close(pf.layout(features), want, rtol=1e-4, atol=1e-4)


def test_layout_is_the_features_without_detail_levels(resnet18: FeatureExtractor) -> None:
    features = torch.randn(2, 5, PatchFeatures(resnet18, feature_dim=32).out_dim)
    assert PatchFeatures(resnet18, feature_dim=32).layout(features) is features
    same = PatchFeatures(resnet18, feature_dim=32, grid_level="layer1")
    assert same.layout_projection is None and same.layout(features) is features


def test_layout_refuses_overlapping_levels(resnet18: FeatureExtractor) -> None:
    """64 + 128 + 256 channels pooled into 32 dimensions: the levels' parts cannot be told
    apart (each level needs a third of feature_dim at least as large as its channel count)."""
    pf = PatchFeatures(resnet18, feature_dim=32, grid_level="layer2")
    assert pf.layout_projection is None
    with pytest.raises(ValueError, match="composition branch cannot read") as refused:
        pf.check_layout()
    assert "structural.levels=layer2,layer3 structural.grid_level=null" in str(refused.value)
    with pytest.raises(ValueError, match="composition branch cannot read"):
        pf.layout(torch.zeros(1, pf.out_dim))


def test_the_composition_branch_reads_the_layout(resnet18: FeatureExtractor) -> None:
    from engine.detector import StructuralSide
    from engine.models.composition import CompositionConfig, CompositionModel

    pf = PatchFeatures(resnet18, feature_dim=1024, grid_level="layer2")
    side = StructuralSide(
        StructuralModel(pf, torch.randn(20, pf.out_dim)),
        CompositionModel(CompositionConfig(), pf.out_dim, (8, 8)),
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, grid, fine = side.composition_features(x)
        features, _ = pf(x)
    assert grid == (8, 8) and fine is None
    torch.testing.assert_close(got, pf.layout(features))
