"""Structural module: patch-feature shapes and maths, memory bank, scores, maps, bad inputs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine.models import patch_features
from engine.models.backbones import FeatureExtractor, load_backbone
from engine.models.structural import (
    PatchFeatures,
    StructuralConfig,
    StructuralModel,
    adaptive_pool_matrix,
    build_memory_bank,
    coreset_bank,
    extract_patch_features,
    resize_input,
    rotate_images,
)


def backbone(arch: str = "resnet18") -> FeatureExtractor:
    return load_backbone(
        arch, ("layer2", "layer3"), weights="random", allow_random=True, verbose=False
    )


@pytest.fixture(scope="module")
def resnet18() -> FeatureExtractor:
    torch.manual_seed(0)
    return backbone()


@pytest.mark.parametrize("n_in, n_out", [(512, 1024), (1024, 1024), (2048, 1024), (7, 3), (40, 64)])
def test_adaptive_pool_matrix_equals_adaptive_avg_pool1d(n_in: int, n_out: int) -> None:
    x = torch.randn(5, n_in)
    want = F.adaptive_avg_pool1d(x[:, None], n_out)[:, 0]
    torch.testing.assert_close(x @ adaptive_pool_matrix(n_in, n_out), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_patch_feature_shapes(arch: str, request: pytest.FixtureRequest) -> None:
    extractor = request.getfixturevalue("resnet18") if arch == "resnet18" else backbone(arch)
    pf = PatchFeatures(extractor, feature_dim=48)
    with torch.no_grad():
        features, grid = pf(torch.randn(2, 3, 64, 96))
    # layer2 has stride 8: an 8 x 12 grid.
    assert grid == (8, 12)
    assert features.shape == (2, 8 * 12, 48)
    assert features.dtype == torch.float32


def test_patch_features_follow_patchcore_recipe(resnet18: FeatureExtractor) -> None:
    """Independent PatchCore-order computation: 3x3 average, per-level adaptive pooling over
    channels, coarser level upsampled, stacked levels pooled again."""
    pf = PatchFeatures(resnet18, feature_dim=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, (h, w) = pf(x)
        maps = resnet18(x)
    per_level = []
    for level in ("layer2", "layer3"):
        f = F.avg_pool2d(maps[level], 3, stride=1, padding=1)
        f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        f = f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])  # (B*h*w, C)
        per_level.append(F.adaptive_avg_pool1d(f[:, None], 64)[:, 0])
    stacked = torch.stack(per_level, dim=1).reshape(-1, 1, 2 * 64)
    want = F.adaptive_avg_pool1d(stacked, 64)[:, 0].reshape(2, h * w, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, rank", [("resnet18", 384), ("efficientnet_lite0", 152)])
def test_compact_features_are_an_isometry(arch: str, rank: int) -> None:
    """Compact coordinates have the rank of the feature space (the backbones' 128 + 256 and
    40 + 112 channels) and keep every distance, so bank scores are PatchCore's."""
    torch.manual_seed(2)
    extractor = backbone(arch)
    compact, full = PatchFeatures(extractor, 1024), PatchFeatures(extractor, 1024, compact=False)
    assert (compact.out_dim, full.out_dim) == (rank, 1024)
    train, query = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (a, _), (b, _) = compact(train), full(train)
        a, b = a.reshape(-1, rank), b.reshape(-1, 1024)
        da, db = torch.cdist(a.double(), a.double()), torch.cdist(b.double(), b.double())
        torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-4)
        scores = [StructuralModel(pf, bank)(query) for pf, bank in ((compact, a), (full, b))]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)


def test_the_basis_travels_in_the_state_dict(
    resnet18: FeatureExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compact basis is not unique (LAPACK returns another basis of a repeated singular
    subspace with another thread count): a loaded model must use the saved one, the basis its
    bank was built in, not one computed again."""
    built = StructuralModel(PatchFeatures(resnet18, 1024))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features, _ = built.patch_features(x)
    built.set_bank(features[0, :50])
    state = built.state_dict()
    assert {"patch_features.basis", "patch_features.projection_layer2"} <= set(state)

    original = patch_features.column_basis

    def rotated(matrix: torch.Tensor) -> torch.Tensor:  # another valid basis of the same space
        basis = original(matrix)
        q, _ = torch.linalg.qr(torch.randn(basis.shape[1], basis.shape[1], dtype=basis.dtype))
        return basis @ q

    monkeypatch.setattr(patch_features, "column_basis", rotated)
    loaded = StructuralModel(PatchFeatures(resnet18, 1024))
    with torch.no_grad():
        assert not torch.allclose(loaded.patch_features(x)[0], features, atol=1e-3)
        loaded.load_state_dict(state)
        torch.testing.assert_close(loaded(x), built(x))


def test_compact_features_config_round_trip() -> None:
    model = StructuralModel.from_config(
        StructuralConfig(backbone="efficientnet_lite0", compact_features=False),
        "random",
        allow_random=True,
        verbose=False,
    )
    assert model.patch_features.out_dim == 1024
    with pytest.raises(ValueError, match="compact_features must be a bool"):
        StructuralConfig(compact_features="yes")


def test_patch_features_deterministic(resnet18: FeatureExtractor) -> None:
    pf = PatchFeatures(resnet18, feature_dim=32)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(pf(x)[0], pf(x)[0])


def test_bank_scores_and_map(resnet18: FeatureExtractor) -> None:
    torch.manual_seed(1)
    pf = PatchFeatures(resnet18, feature_dim=32)
    train = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    cfg = StructuralConfig(feature_dim=32, coreset_ratio=0.25)
    model = StructuralModel(pf).fit([(x, torch.arange(2)) for x in train], cfg, progress=False)
    assert model.bank.shape == (int(6 * 64 * 0.25), 32) and model.bank.dtype == torch.float32

    query = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        scores = model(query)
        feats, _ = pf(query)
        amap = model.anomaly_map(query)
    want = torch.cdist(feats[0].double(), model.bank.double()).min(1).values.reshape(1, 8, 8)
    torch.testing.assert_close(scores.double(), want, rtol=1e-4, atol=1e-4)
    assert amap.shape == (1, 64, 64)
    torch.testing.assert_close(
        amap,
        F.interpolate(scores[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0],
    )
    # A training image's patches with the full bank score (almost) zero.
    full = StructuralModel(pf).fit(
        train[:1], StructuralConfig(feature_dim=32, coreset_ratio=1.0), progress=False
    )
    with torch.no_grad():
        assert float(full(train[0][:1]).max()) < 1e-2


def test_float16_bank_and_state_dict_round_trip(resnet18: FeatureExtractor) -> None:
    pf = PatchFeatures(resnet18, feature_dim=32)
    cfg = StructuralConfig(feature_dim=32, coreset_ratio=0.5, bank_dtype="float16")
    bank = build_memory_bank(pf, [torch.randn(1, 3, 64, 64)], cfg, progress=False)
    assert bank.shape == (32, 32) and bank.dtype == torch.float16
    model = StructuralModel(pf, bank)
    restored = StructuralModel(PatchFeatures(resnet18, feature_dim=32))
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.bank, bank)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_onnx_export_matches_eager(resnet18: FeatureExtractor) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = StructuralModel(PatchFeatures(resnet18, feature_dim=32), torch.randn(50, 32)).eval()
    x = torch.randn(1, 3, 64, 64)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["scores"])
    got = ort.InferenceSession(buffer.getvalue()).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_config_defaults_and_validation() -> None:
    cfg = StructuralConfig()
    assert (cfg.backbone, cfg.levels, cfg.image_size, cfg.patch_size) == (
        "resnext101_32x8d",
        ("layer2", "layer3"),
        256,
        3,
    )
    assert (cfg.feature_dim, cfg.coreset_ratio, cfg.coreset_projection_dim, cfg.index, cfg.k) == (
        1024,
        0.1,
        128,
        "auto",
        1,
    )
    bad = [
        {"patch_size": 2},
        {"feature_dim": 0},
        {"coreset_ratio": 0.0},
        {"coreset_ratio": 1.5},
        {"index": "annoy"},
        {"bank_dtype": "int8"},
        {"k": 3},
        {"image_size": True},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            StructuralConfig(**kwargs)


def test_bad_inputs(resnet18: FeatureExtractor) -> None:
    pf = PatchFeatures(resnet18, feature_dim=32)
    model = StructuralModel(pf)
    with pytest.raises(RuntimeError, match="no memory bank"):
        model(torch.randn(1, 3, 64, 64))
    for bank in (
        torch.randn(5, 31),
        torch.randn(0, 32),
        torch.ones(5, 32, dtype=torch.int32),
        torch.full((5, 32), float("nan")),
    ):
        with pytest.raises(ValueError):
            model.set_bank(bank)
    for kwargs in ({"feature_dim": 0}, {"patch_size": 2}, {"patch_size": -1}):
        with pytest.raises(ValueError):
            PatchFeatures(resnet18, **kwargs)
    cfg = StructuralConfig(feature_dim=32)
    with pytest.raises(ValueError, match="no images"):
        build_memory_bank(pf, [], cfg, progress=False)
    with pytest.raises(ValueError, match="images"):
        build_memory_bank(pf, [torch.randn(3, 64, 64)], cfg, progress=False)


@pytest.mark.slow
def test_structural_only_detects_synthetic_structural_defects(tmp_path: Path) -> None:
    """End to end on a small synthetic pushpins category with the offline EfficientNet-Lite0
    ImageNet weights: structural image AUROC (good vs structural test images) must beat chance."""
    from engine.data.loco import LocoDataset
    from engine.data.synthetic import generate_category
    from engine.data.transforms import ImageFolderDataset, ImageTransform
    from engine.metrics import auroc

    generate_category(
        tmp_path, "pushpins", seed=0, n_train=20, n_validation=1, n_test_good=8,
        n_logical=1, n_structural=8, progress=False,
    )  # fmt: skip
    dataset = LocoDataset(tmp_path, "pushpins")
    cfg = StructuralConfig(backbone="efficientnet_lite0", image_size=256, feature_dim=256)
    model = StructuralModel.from_config(cfg, verbose=False)
    weights = model.patch_features.backbone.weights
    if weights.source == "random":
        pytest.skip("no pretrained EfficientNet-Lite0 weights installed")
    transform = ImageTransform(cfg.image_size, weights.mean, weights.std)
    train = ImageFolderDataset(dataset.samples("train"), transform, progress=False)
    model.fit(DataLoader(train, batch_size=4), cfg, progress=False)

    test = [s for s in dataset.samples("test") if s.defect_type != "logical_anomalies"]
    images = ImageFolderDataset(test, transform, progress=False)
    with torch.no_grad():
        scores = torch.cat(
            [model.anomaly_map(x).amax(dim=(1, 2)) for x, _ in DataLoader(images, batch_size=4)]
        )
    labels = np.array([s.defect_type == "structural_anomalies" for s in test])
    value = auroc(scores.numpy()[~labels], scores.numpy()[labels])
    assert value > 0.5, value


def test_search_bank_follows_the_precision(resnet18: FeatureExtractor) -> None:
    pf = PatchFeatures(resnet18, feature_dim=48)
    model = StructuralModel(pf, torch.randn(5, pf.out_dim))
    queries = torch.randn(1, 3, pf.out_dim)
    exact = model.score_features(queries, (1, 3))
    model.set_search_dtype(torch.float16)
    assert model.search_bank.dtype == torch.float16
    assert torch.equal(model.search_bank_sq, model.search_bank.float().pow(2).sum(1))
    torch.testing.assert_close(model.score_features(queries, (1, 3)), exact, atol=1e-2, rtol=0)
    model.set_bank(torch.randn(7, pf.out_dim))  # a new bank keeps the search dtype
    assert model.search_bank.shape == (7, pf.out_dim)
    assert model.search_bank.dtype == torch.float16
    model.set_search_dtype(None)
    assert model.search_bank is None


@pytest.mark.parametrize(("flips", "copies"), [("none", 1), ("h", 2), ("v", 2), ("hv", 4)])
def test_bank_flips_add_the_flipped_images_patches(
    resnet18: FeatureExtractor, flips: str, copies: int
) -> None:
    pf = PatchFeatures(resnet18, feature_dim=32)
    image = torch.randn(1, 3, 64, 64)
    cfg = StructuralConfig(feature_dim=32, coreset_ratio=1.0, bank_flips=flips)
    bank = build_memory_bank(pf, [image], cfg, progress=False)
    assert bank.shape[0] == copies * 8 * 8
    model = StructuralModel(pf, bank)
    with torch.no_grad():
        mirrored = float(model(image.flip(3)).max())
        turned = float(model(image.flip((2, 3))).max())
    # a flipped copy in the bank scores (almost) zero; without it the mirror image is novel
    assert (mirrored < 1e-2) == (flips in ("h", "hv"))
    assert (turned < 1e-2) == (flips == "hv")


def test_bank_flips_must_be_named() -> None:
    with pytest.raises(ValueError, match="bank_flips"):
        StructuralConfig(bank_flips="rot90")


def test_rotate_images_turns_about_the_centre_and_keeps_the_aspect() -> None:
    square = torch.randn(2, 3, 16, 16)
    # a quarter turn of a square grid maps pixels onto pixels: torch.rot90, one way or the other
    quarter = rotate_images(square, 90.0)
    assert any(torch.allclose(quarter, square.rot90(k, dims=(2, 3)), atol=1e-4) for k in (1, 3))
    torch.testing.assert_close(rotate_images(square, 0.0), square, atol=1e-5, rtol=0)
    # on a wide image the turn is rigid in pixels (not in [-1, 1] units, which would shear
    # it): a spot 40 px right of the centre stays 40 px away, 10 degrees round
    h, w = 64, 128
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    spot = torch.exp(-((xs - w / 2 - 40) ** 2 + (ys - h / 2) ** 2) / 8.0)[None, None]
    turned = rotate_images(spot, 10.0)[0, 0]
    assert turned.shape == (h, w)
    cx = float((turned * (xs - w / 2)).sum() / turned.sum())
    cy = float((turned * (ys - h / 2)).sum() / turned.sum())
    assert abs(math.hypot(cx, cy) - 40.0) < 0.3
    assert abs(abs(math.degrees(math.atan2(cy, cx))) - 10.0) < 0.3


def test_bank_rotations_widen_the_coreset_choice_not_the_bank(resnet18: FeatureExtractor) -> None:
    pf = PatchFeatures(resnet18, feature_dim=32)
    torch.manual_seed(1)
    image = F.interpolate(torch.randn(1, 3, 8, 8), size=(64, 64), mode="bilinear")
    plain = build_memory_bank(pf, [image], StructuralConfig(feature_dim=32), progress=False)
    cfg = StructuralConfig(feature_dim=32, bank_rotations=(-10.0, 10.0))
    bank = build_memory_bank(pf, [image], cfg, progress=False)
    assert bank.shape == plain.shape == (int(0.1 * 8 * 8), pf.out_dim)
    # with every patch kept, the turned copies' patches are in the bank: a turned test image
    # then scores lower than against the unturned image's patches alone
    every = StructuralConfig(feature_dim=32, coreset_ratio=1.0)
    alone = StructuralModel(pf, build_memory_bank(pf, [image], every, progress=False))
    turned_cfg = StructuralConfig(feature_dim=32, coreset_ratio=1.0, bank_rotations=(10.0,))
    both = StructuralModel(pf, build_memory_bank(pf, [image], turned_cfg, progress=False))
    assert both.bank.shape == alone.bank.shape  # the size of the unturned image's patches
    with torch.no_grad():
        query = rotate_images(image, 10.0)
        assert float(both(query).mean()) < float(alone(query).mean())


def test_coreset_bank_of_chunks_is_the_bank_of_their_concatenation() -> None:
    torch.manual_seed(3)
    chunks = [torch.randn(2, 16, 12), torch.randn(3, 16, 12), torch.randn(1, 16, 12)]
    cfg = StructuralConfig(feature_dim=12, coreset_ratio=0.2, coreset_projection_dim=4)
    torch.testing.assert_close(
        coreset_bank(chunks, cfg, progress=False),
        coreset_bank(torch.cat(chunks), cfg, progress=False),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("turns", [(0.0,), (20.0,), (float("nan"),), (True,), [5.0]])
def test_bank_rotations_must_be_small_nonzero_angles(turns) -> None:
    with pytest.raises(ValueError, match="bank_rotations"):
        StructuralConfig(bank_rotations=turns)


def test_resize_input_is_antialiased_bilinear_and_a_no_op_at_its_own_size() -> None:
    x = torch.randn(2, 3, 48, 48)
    assert resize_input(x, 48) is x
    want = F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_input(x, 40), want)
    # Normalising is per-channel affine, so it commutes with the resize.
    mean, std = (
        torch.tensor([0.4, 0.5, 0.6])[:, None, None],
        torch.tensor([0.2, 0.3, 0.25])[:, None, None],
    )
    torch.testing.assert_close(resize_input((x - mean) / std, 40), (want - mean) / std)


def test_extract_patch_features_at_another_size(resnet18: FeatureExtractor) -> None:
    pf = PatchFeatures(resnet18, feature_dim=32)
    images = torch.randn(3, 3, 64, 64)
    features, grid = extract_patch_features(pf, [images], progress=False, size=48)
    assert grid == (6, 6) and features.shape == (3, 36, pf.out_dim)
    with torch.no_grad():
        want, _ = pf(resize_input(images, 48))
    torch.testing.assert_close(features, want)
