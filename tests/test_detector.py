"""Detector-level deployment transforms."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch
from torch import nn

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
