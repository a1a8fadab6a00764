"""The logical decoder must not collapse into a fixed template (issue 11).

A short cpu-preset training on a tiny synthetic set: with the engine's settings (fused
bottleneck input, OCE strides 1/1, k-means codebooks with dead-entry restart) every compared
decoder level varies across images; with the paper's literal settings at 128 px (layer4 alone
through two stride-2 convolutions into a 1×1 bottleneck, codebooks seeded from one batch, no
restart) a level collapses, which shows that the criterion catches collapse.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.data.loco import LocoDataset
from engine.data.synthetic import generate_category
from engine.data.transforms import ImageFolderDataset, ImageTransform
from engine.models.logical import LogicalModel, cpu_preset
from engine.models.logical_diagnostics import logical_diagnostics
from engine.train import cpu_train_preset, train_logical

# one thread: tiny tensors train faster, and the result does not depend on the core count
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PAPER_LITERAL = {
    "bottleneck_input": "last",
    "oce_strides": (2, 2),
    "codebook_init": "batch",
    "codebook_restart": False,
}


@pytest.fixture(scope="module")
def tiny_pushpins(tmp_path_factory: pytest.TempPathFactory) -> LocoDataset:
    root = tmp_path_factory.mktemp("collapse")
    generate_category(
        root, "pushpins", seed=1, size=(170, 100), n_train=24, n_validation=8,
        n_test_good=1, n_logical=1, n_structural=1, progress=False,
    )  # fmt: skip
    return LocoDataset(root, "pushpins")


def _trained_diagnostics(dataset: LocoDataset, **overrides) -> dict:
    torch.manual_seed(0)
    config = replace(cpu_preset(), **overrides)
    model = LogicalModel.build(config, None, "auto", verbose=False)
    transform = ImageTransform(
        config.image_size, model.encoder.weights.mean, model.encoder.weights.std
    )
    train = ImageFolderDataset(dataset.samples("train"), transform, progress=False)
    probe = ImageFolderDataset(dataset.samples("validation"), transform, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and the result reproducible
    try:
        # 288 steps (48 epochs of 24 images): a short training, enough to leave the template
        train_logical(
            model, train, None, replace(cpu_train_preset(), steps=288), None, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return logical_diagnostics(model, torch.stack([probe[i][0] for i in range(len(probe))]))


def test_every_decoder_level_varies_across_images(tiny_pushpins: LocoDataset) -> None:
    diagnostics = _trained_diagnostics(tiny_pushpins)
    assert diagnostics["collapsed_levels"] == [], diagnostics["levels"]
    assert all(c["usage"] >= 15 for c in diagnostics["codebooks"].values())


def test_the_paper_literal_settings_collapse_at_128_px(tiny_pushpins: LocoDataset) -> None:
    diagnostics = _trained_diagnostics(tiny_pushpins, **PAPER_LITERAL)
    assert diagnostics["collapsed_levels"] != [], diagnostics["levels"]
