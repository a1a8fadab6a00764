"""Settings of the logical module's training loop (:class:`TrainConfig`, the cpu preset).
Kept apart from the loop so that configs load without importing the model code."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings. Paper: Adam, betas (0.5, 0.999), 50 epochs, batch 1; its
    learning rate was lost in extraction, so 5e-3 as in RD4AD. ``amp`` only acts on CUDA
    (float16 autocast + gradient scaling). ``early_stop_patience``: stop after this many epochs
    without a lower validation loss (None = never). ``steps``: when set, the number of epochs
    is derived from the training set, ``ceil(steps / steps per epoch)``, and ``epochs`` is not
    used: training time then does not grow with the data (the cpu preset's 720 steps are 48
    epochs of 60 images and 9 of 350)."""

    epochs: int = 50
    steps: int | None = None
    batch_size: int = 1
    lr: float = 5e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    amp: bool = True
    early_stop_patience: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be None or positive, got {self.steps}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be positive, got {self.epochs}, {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ValueError(
                f"early_stop_patience must be None or >= 1, got {self.early_stop_patience}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


def _check_types(cfg: TrainConfig) -> None:
    """Declared types, before the range checks compare them (a str must not reach ``<``)."""

    def is_int(value: Any) -> bool:
        return type(value) is int

    def is_number(value: Any) -> bool:
        return type(value) in (int, float)

    checks = {
        "epochs": (is_int(cfg.epochs), "an integer"),
        "steps": (cfg.steps is None or is_int(cfg.steps), "an integer or null"),
        "batch_size": (is_int(cfg.batch_size), "an integer"),
        "lr": (is_number(cfg.lr), "a number"),
        "betas": (
            isinstance(cfg.betas, tuple | list)
            and len(cfg.betas) == 2
            and all(map(is_number, cfg.betas)),
            "two numbers",
        ),
        "seed": (is_int(cfg.seed), "an integer"),
        "amp": (type(cfg.amp) is bool, "true or false"),
        "early_stop_patience": (
            cfg.early_stop_patience is None or is_int(cfg.early_stop_patience),
            "an integer or null",
        ),
        "num_workers": (is_int(cfg.num_workers), "an integer"),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(cfg, name)!r}")


def epochs_for(cfg: TrainConfig, train_size: int) -> TrainConfig:
    """``cfg`` with ``epochs`` resolved for a training set of ``train_size`` images (see
    ``TrainConfig.steps``); unchanged when ``steps`` is None."""
    if cfg.steps is None:
        return cfg
    per_epoch = math.ceil(train_size / cfg.batch_size)
    return replace(cfg, epochs=max(1, math.ceil(cfg.steps / per_epoch)))


def cpu_train_preset() -> TrainConfig:
    """Loop settings for :func:`engine.models.logical.cpu_preset` on 2 CPU cores.

    Batch 4 amortises per-step overhead on CPU. 720 steps (48 epochs of 60 images): with 240
    the coarse decoder levels had not yet learned to follow the image (decoder/encoder
    across-image std 0.18 at layer2 on synthetic pushpins, a collapsed template by the build's
    criterion), with 720 they do (0.50); docs/ACCURACY.md. A step budget rather than epochs
    keeps a LOCO-size category (350 images) inside its build-time budget. Small CPU models train much faster
    with ``torch.set_num_threads(1)`` when the cores are shared: synchronising two threads on
    tiny tensors cost 10x here.
    """
    return TrainConfig(epochs=48, steps=720, batch_size=4, lr=2e-3, early_stop_patience=None)
