"""Training loop of the logical module: Adam, per-epoch atomic checkpoints, resume, early stop.

Checkpoints live in ``checkpoint_dir``: ``last.pt`` (written after every epoch: decoder,
optimiser, AMP scaler, RNG state, loss and diagnostics history, configs) and ``best.pt`` (the
decoder of the epoch with the lowest validation loss, when there is a validation set). Both are
written atomically (:mod:`engine.train_checkpoints`), so an interruption at any moment leaves
the previous complete file. Only the trainable :class:`FusionDecoder` is saved: the encoder is
frozen and comes from the backbone weights.

:func:`train_logical` is a short orchestration of named steps over a :class:`TrainState`:
``_resume``, then per epoch ``_run_epoch``, the optional ``diagnose`` hook, ``_track_best``,
``_save_last`` and ``_should_stop``, and finally ``_restore_best``.

Each ``last.pt`` also records the configs and a fingerprint of the other inputs (data, weights,
text prior); a resume with anything different is refused. The build's ``--fresh`` discards a
checkpoint folder with :func:`discard_checkpoints`, which only ever deletes the files named here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from engine.models.logical import LogicalModel, logical_loss
from engine.train_checkpoints import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    START_FRESH,
    atomic_save,
    check_checkpoint_dir,
    check_resumable,
    check_storable,
    discard_checkpoints,
    load_best,
    load_checkpoint,
)
from engine.train_config import TrainConfig, cpu_train_preset, epochs_for

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Per-epoch mean losses (index k = epoch k + 1), the epoch (1-based) whose weights the
    model holds on return, wall time of this call, how many epochs were already done, and the
    per-epoch diagnostics (see :func:`train_logical`'s ``diagnose``)."""

    train_losses: list[float]
    val_losses: list[float]
    best_epoch: int
    seconds: float
    resumed_epochs: int = 0
    stopped_early: bool = False
    diagnostics: list[dict[str, Any]] = field(default_factory=list)


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, tuple | list) else batch


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Derived per epoch so a resumed run shuffles exactly as an uninterrupted one.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class TrainState:
    """Where a training stands after ``epoch`` completed epochs; ``last.pt`` records all of it
    but ``best_weights``, this call's in-memory copy of the best validation epoch's decoder
    (``best.pt`` holds it on disk). ``diagnostics``: one entry per diagnosed epoch, each with
    its 1-based ``"epoch"``."""

    epoch: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = math.inf
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None


@dataclass
class _Run:
    """What stays fixed during one :func:`train_logical` call."""

    model: LogicalModel
    cfg: TrainConfig
    device: torch.device
    use_amp: bool
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ckpt_dir: Path | None
    model_cfg: dict[str, Any]
    train_cfg: dict[str, Any]
    inputs: dict[str, str]

    @property
    def last_path(self) -> Path | None:
        return self.ckpt_dir / LAST_CHECKPOINT if self.ckpt_dir is not None else None


Diagnose = Callable[[LogicalModel, int], dict[str, Any]]


def train_logical(
    model: LogicalModel,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    fingerprint: dict[str, str] | None = None,
    diagnose: Diagnose | None = None,
) -> TrainResult:
    """Train ``model.decoder`` on ``train_set`` (items ``(image (3, H, W), idx)``).

    Seeds torch's global RNG with ``cfg.seed`` (model initialisation is the caller's). With a
    ``checkpoint_dir`` holding ``last.pt`` from a run with the same model and train configs
    (``epochs`` and early-stop patience may differ) and the same ``fingerprint`` (digests of
    the other inputs: data, weights, text prior; see ``engine.preflight.data_fingerprint``),
    training resumes after its last epoch and gives the same result as an uninterrupted run on
    CPU. With a validation set, the model ends with the weights of the best validation epoch.

    ``diagnose(model, epoch)`` runs after each epoch (1-based), after validation; its dict of
    plain values (str, int, float, bool, None, lists, dicts) joins ``TrainResult.diagnostics``
    with an ``"epoch"`` key and is checkpointed, so a resumed run keeps the earlier entries.
    It runs with the RNG state saved and restored, so it cannot change the training.

    Raises ValueError on a config or fingerprint mismatch, an unreadable checkpoint or an empty
    training set, RuntimeError on a non-finite loss, TypeError when ``diagnose`` returns other
    values; KeyboardInterrupt is re-raised after saying which checkpoint is intact.
    """
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    cfg = epochs_for(cfg, len(train_set))
    run = _setup(model, cfg, checkpoint_dir, device, fingerprint)
    state = _resume(run)
    resumed_epochs, began = state.epoch, time.perf_counter()
    stopped_early = _should_stop(cfg, state)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    with (
        tqdm(
            total=cfg.epochs * steps,
            initial=min(state.epoch, cfg.epochs) * steps,
            desc="train logical",
            unit="step",
            disable=not progress,
        ) as bar,
        _report_interrupt(run.last_path),
    ):
        while state.epoch < cfg.epochs and not stopped_early:
            _run_epoch(run, state, train_set, val_set, bar)
            if diagnose is not None:
                _diagnose(run, state, diagnose)
            _track_best(run, state, validated=val_set is not None)
            _save_last(run, state)
            stopped_early = _should_stop(cfg, state)
    _restore_best(run, state)
    return TrainResult(
        train_losses=state.train_losses,
        val_losses=state.val_losses,
        best_epoch=state.best_epoch,
        seconds=time.perf_counter() - began,
        resumed_epochs=resumed_epochs,
        stopped_early=stopped_early,
        diagnostics=state.diagnostics,
    )


def _setup(
    model: LogicalModel,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None,
    device: str | torch.device,
    fingerprint: dict[str, str] | None,
) -> _Run:
    """Move the model, create the optimiser and gradient scaler. The checkpoint folder is made
    by the first checkpoint written, so a run that fails before its first epoch ends leaves
    none behind."""
    device = torch.device(device)
    use_amp = cfg.amp and device.type == "cuda"
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    model.to(device)
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    return _Run(
        model=model,
        cfg=cfg,
        device=device,
        use_amp=use_amp,
        optimizer=torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp),
        ckpt_dir=ckpt_dir,
        model_cfg=model.config.to_dict(),
        train_cfg=asdict(cfg),
        inputs=dict(fingerprint or {}),
    )


def _resume(run: _Run) -> TrainState:
    """The state saved in ``last.pt`` (model, optimiser, scaler and RNG restored from it), or a
    fresh state with the RNG seeded when there is none."""
    last_path = run.last_path
    if last_path is None or not last_path.exists():
        torch.manual_seed(run.cfg.seed)
        return TrainState()
    saved = load_checkpoint(last_path)
    check_resumable(saved, last_path, run.model_cfg, run.train_cfg, run.inputs)
    try:
        run.model.decoder.load_state_dict(saved["decoder"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        if run.use_amp and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"])
        return TrainState(
            epoch=int(saved["epoch"]),
            train_losses=list(saved["train_losses"]),
            val_losses=list(saved["val_losses"]),
            best_epoch=int(saved["best_epoch"]),
            best_val=float(saved["best_val"]),
            diagnostics=list(saved["diagnostics"]),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"checkpoint {last_path} is damaged ({error!r}); {START_FRESH}") from error


def _run_epoch(
    run: _Run, state: TrainState, train_set: Dataset, val_set: Dataset | None, bar: tqdm
) -> None:
    """Train one epoch (shuffled by its own generator), then measure the validation loss."""
    cfg = run.cfg
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=_epoch_generator(cfg.seed, state.epoch),
        num_workers=cfg.num_workers,
    )
    if state.epoch == 0 and run.model.config.codebook_init == "kmeans":
        _init_codebooks(run, train_set)
    state.train_losses.append(
        _train_epoch(
            run.model, loader, run.optimizer, run.scaler, run.device, run.use_amp, bar, state.epoch
        )
    )
    if run.model.config.codebook_restart:
        run.model.decoder.restart_dead_codes()
    state.epoch += 1
    if val_set is not None:
        state.val_losses.append(evaluate_loss(run.model, val_set, cfg, run.device, run.use_amp))
        bar.set_postfix(epoch=state.epoch, val=f"{state.val_losses[-1]:.4f}")


CODEBOOK_INIT_IMAGES = 64  # training images whose atrous output seeds the codebook k-means


def _init_codebooks(run: _Run, train_set: Dataset) -> None:
    """k-means codebooks from the first training images (in order, so it is reproducible)."""
    count = min(len(train_set), CODEBOOK_INIT_IMAGES)
    loader = DataLoader(
        torch.utils.data.Subset(train_set, range(count)),
        batch_size=max(run.cfg.batch_size, 4),
        num_workers=run.cfg.num_workers,
    )
    run.model.init_codebooks((_images(b).to(run.device) for b in loader), seed=run.cfg.seed)


def _diagnose(run: _Run, state: TrainState, diagnose: Diagnose) -> None:
    """Append ``diagnose``'s entry for the epoch just run, leaving every RNG as it was."""
    accelerators = [] if run.device.type == "cpu" else [run.device]
    with torch.random.fork_rng(
        devices=accelerators, device_type=run.device.type if accelerators else None
    ):
        entry = diagnose(run.model, state.epoch)
    check_storable(entry, "diagnose()")
    state.diagnostics.append({"epoch": state.epoch, **entry})


def _track_best(run: _Run, state: TrainState, validated: bool) -> None:
    """Keep the epoch with the lowest validation loss (in memory and in ``best.pt``); without
    a validation set the latest epoch is the one kept."""
    if not validated:
        state.best_epoch = state.epoch
        return
    if state.val_losses[-1] >= state.best_val:
        return
    state.best_val, state.best_epoch = state.val_losses[-1], state.epoch
    state.best_weights = _cpu_state(run.model)
    if run.ckpt_dir is not None:
        best = {"format": CHECKPOINT_FORMAT, "epoch": state.epoch, "decoder": state.best_weights}
        atomic_save(best, run.ckpt_dir / BEST_CHECKPOINT)


def _save_last(run: _Run, state: TrainState) -> None:
    """Write ``last.pt``: everything a resume needs to continue exactly where this epoch ends."""
    if run.last_path is None:
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epoch,
        "model_config": run.model_cfg,
        "train_config": run.train_cfg,
        "fingerprint": run.inputs,
        "decoder": run.model.decoder.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if run.use_amp else None,
        "train_losses": state.train_losses,
        "val_losses": state.val_losses,
        "best_epoch": state.best_epoch,
        "best_val": state.best_val,
        "diagnostics": state.diagnostics,
    }
    atomic_save(checkpoint, run.last_path)


def _should_stop(cfg: TrainConfig, state: TrainState) -> bool:
    """Early stop: ``early_stop_patience`` epochs since the best validation loss."""
    patience = cfg.early_stop_patience
    return (
        bool(state.val_losses)
        and patience is not None
        and state.epoch - state.best_epoch >= patience
    )


def _restore_best(run: _Run, state: TrainState) -> None:
    """Put the model in eval mode holding the best validation epoch's weights."""
    run.model.eval()
    if not state.val_losses or state.best_epoch == len(state.train_losses):
        return
    weights = state.best_weights
    if weights is None:  # the best epoch came before a resume
        assert run.ckpt_dir is not None  # a resume needs a checkpoint folder
        weights = load_best(run.ckpt_dir / BEST_CHECKPOINT)
    run.model.decoder.load_state_dict(weights)


@contextmanager
def _report_interrupt(last_path: Path | None) -> Iterator[None]:
    """On Ctrl-C, say which checkpoint is intact before re-raising."""
    try:
        yield
    except KeyboardInterrupt:
        intact = last_path if last_path is not None and last_path.exists() else "none"
        log.warning("training interrupted; last complete checkpoint: %s", intact)
        raise


def _train_epoch(
    model: LogicalModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    use_amp: bool,
    bar: tqdm,
    epoch: int,
) -> float:
    """One pass over ``loader``; returns the mean total loss of its steps."""
    model.train()
    running = 0.0
    for step, batch in enumerate(loader):
        images = _images(batch).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            output = model(images)
        loss = logical_loss(output, images, model.config).total
        if not torch.isfinite(loss):
            hint = " under float16 autocast; try --set train.amp=false" if use_amp else ""
            raise RuntimeError(
                f"non-finite training loss {loss.item()} at epoch {epoch + 1}, step {step + 1}"
                f"{hint}"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        running += loss.item()
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{running / (step + 1):.4f}")
    return running / len(loader)


def _cpu_state(model: LogicalModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.decoder.state_dict().items()}


@torch.no_grad()
def evaluate_loss(
    model: LogicalModel,
    dataset: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    use_amp: bool = False,
) -> float:
    """Mean total loss over ``dataset`` in eval mode (BatchNorm running statistics)."""
    if len(dataset) == 0:
        raise ValueError("the validation set is empty")
    model.eval()
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers):
        images = _images(batch).to(device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            output = model(images)
        loss = logical_loss(output, images, model.config).total.item()
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite validation loss {loss}")
        total += loss * images.shape[0]
        count += images.shape[0]
    return total / count


__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "Diagnose",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "check_checkpoint_dir",
    "cpu_train_preset",
    "discard_checkpoints",
    "evaluate_loss",
    "train_logical",
]
