"""Detector-level deployment transforms."""

from __future__ import annotations

import runpy
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.detector import Detector
from engine.models.composition import CompositionConfig, CompositionModel
from engine.models.structural import resize_input
from engine.stage_timer import StageTimer

TINY = runpy.run_path(str(Path(__file__).parent / "reliability" / "tiny.py"))


def test_folding_batchnorm_keeps_every_map_and_removes_the_batchnorms() -> None:
    detector, _ = TINY["tiny_detector"](0)
    frames = torch.randint(
        0, 256, (2, 40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    before = detector(frames)
    calls: list[int] = []
    for bn in [*detector.logical.modules(), *detector.structural.modules()]:
        if isinstance(bn, nn.BatchNorm2d):
            bn.register_forward_hook(lambda *_: calls.append(1))
    detector(frames)
    assert calls, "the tiny detector has BatchNorms to fold"

    assert detector.fold_batchnorm() > 0

    calls.clear()
    after = detector(frames)
    assert not calls, "every BatchNorm follows a convolution and is folded"
    for name in ("fused", "logical", "structural"):
        torch.testing.assert_close(
            getattr(after, name), getattr(before, name), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(
    ("mode", "gate_power", "after_blur"),
    [("gated", 8.0, False), ("gated_after_blur", 8.0, True), ("image", None, False)],
)
def test_the_fusion_module_follows_the_configuration(mode, gate_power, after_blur) -> None:
    tiny, config = TINY["tiny_detector"](0)
    composition = CompositionModel(
        replace(CompositionConfig(enabled=True), fused_map=mode),
        tiny.structural.patch_features.out_dim,
        (4, 4),
    )
    detector = Detector(
        tiny.logical,
        tiny.structural,
        replace(config.fusion, composition_weight=0.25),
        tiny.stats | {"composition": tiny.stats["logical"]},
        structural_size=TINY["SIZE"],
        composition=composition,
    )
    fusion = detector.fusion
    expected = ("logical", "structural", "composition")
    assert fusion.branches == expected and detector.branch_names == expected
    assert (fusion.gate_power, fusion.gate_after_blur) == (gate_power, after_blur)
    assert fusion.sigma == config.fusion.sigma_at(detector.map_size)
    assert detector.weights["composition"] == 0.25
    assert detector.stats == fusion.stats and fusion.threshold_value is None


def test_composition_takes_its_own_pass_at_its_own_size() -> None:
    """``CompositionConfig.image_size``: the memory bank scores the structural input, the
    composition branch the same input resized (its grid: 6x6 at 24 px, not the bank's 8x8)."""
    tiny, config = TINY["tiny_detector"](0)
    own = 24
    detector = TINY["with_composition"](tiny, config, own)
    assert detector.composition is not None and detector.composition.grid == (6, 6)
    frames = torch.randint(
        0, 256, (2, 40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    x = detector.structural_transform.batch(frames, channels_last=True)
    features = tiny.structural.patch_features
    with torch.no_grad():
        bank_features, bank_grid = features(x)
        want_structural = tiny.structural.map_from_features(bank_features, bank_grid, (32, 32))
        want_score, _, placement, _ = detector.composition(*features(resize_input(x, own)))
        side = detector.structural_side(x)
    assert set(side) == {"structural", "composition", "placement"}
    torch.testing.assert_close(side["placement"], placement)
    torch.testing.assert_close(side["structural"], want_structural)
    torch.testing.assert_close(side["composition"], want_score[:, None, None].expand(-1, 32, 32))


def test_overlapping_the_logical_branch_keeps_the_maps_and_the_stage_times() -> None:
    """:meth:`Detector.overlap_logical`: the logical branch runs on the worker thread, the
    structural stream on the caller's; same maps; both stages timed; off again = one thread."""
    detector, _ = TINY["tiny_detector"](0)
    frames = torch.randint(
        0, 256, (2, 40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    expected = detector(frames)
    threads: list[tuple[str, bool]] = []
    logical_fn = detector.logical_fn

    def recorded(x: torch.Tensor) -> torch.Tensor:
        threads.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
        return logical_fn(x)

    detector.logical_fn = recorded
    detector.stage_timer = StageTimer(detector.device)
    detector.overlap_logical(True)
    got = detector(frames)
    assert threads[-1][0].startswith("npgmf-logical") and threads[-1][1]
    for name in ("fused", "logical", "structural"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)
    assert {"structural", "logical"} <= set(detector.stage_timer.elapsed_ms())

    detector.overlap_logical(False)
    detector(frames)
    assert threads[-1][0] == threading.current_thread().name


def test_an_overlapped_frame_that_fails_waits_for_the_other_branch() -> None:
    """A failure in either branch is raised from the call, and only once the worker is idle."""
    detector, _ = TINY["tiny_detector"](0)
    frames = torch.randint(0, 256, (1, 40, 50, 3), dtype=torch.uint8)
    detector.overlap_logical(True)
    finished = threading.Event()
    logical_fn = detector.logical_fn

    def slow_logical(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)
        finished.set()
        return logical_fn(x)

    def broken_structural(x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise RuntimeError("structural stream failed")

    detector.logical_fn, structural_fn = slow_logical, detector.structural_fn
    detector.structural_fn = broken_structural
    with pytest.raises(RuntimeError, match="structural stream failed"):
        detector(frames)
    assert finished.is_set()

    def broken_logical(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("logical branch failed")

    detector.logical_fn, detector.structural_fn = broken_logical, structural_fn
    with pytest.raises(RuntimeError, match="logical branch failed"):
        detector(frames)
    detector.overlap_logical(False)
