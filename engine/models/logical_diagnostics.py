"""Collapse diagnostics of the logical module, computed on a fixed probe batch.

The logical map compares each encoder level with the decoder's reconstruction of it. That only
detects anything if the reconstruction follows the input: a decoder that outputs one fixed
template whatever the image (it "collapsed") turns the map into a distance to that template.
These statistics show collapse while training, through forward hooks and public attributes
only (``model.levels``, ``model.features``, ``model.decoder.oce`` and every decoder submodule
with a ``num_codes`` attribute, i.e. a vector quantiser returning ``(quantized, indices,
loss)``), so they keep working when the decoder's internals change.

Relative std (:func:`relative_std`) of a batch ``x`` (B, C, H, W) of B ≥ 2 images::

    sqrt(mean over (C, H, W) of Var_B(x)) / sqrt(mean over (B, C, H, W) of x²)

with the population variance across the B images. It is the share of the signal's RMS that
changes from image to image: 0 when every image gives the same output, at most 1 (when the
across-image mean is 0), and independent of the feature scale, so encoder and decoder levels
of any width compare directly.

Collapse threshold (:data:`COLLAPSE_RATIO` = 0.2): a level is collapsed when its decoder
relative std is below 0.2 × the encoder's at that level. A healthy decoder reproduces the
encoder, so its across-image spread is of the same order (ratio near 1; a smoothing
reconstruction somewhat below). Measured on trained artifacts: collapsed levels at 0.000 (pushpins
layer2/layer3, encoder 0.54/0.44) and 0.016–0.02 (held-out LOCO layer2/3); the live pushpins
layer1 at 0.56 (0.35 vs 0.63). 0.2 leaves a factor of about 3 below the live level and 10
above the collapsed ones. In variance terms it means the decoder carries under 4 % of the
encoder's across-image variance, so at least 96 % of what that level's map compares is a fixed
template. It also flags the held-out LOCO layer1 at 0.11 (0.05 vs 0.45), where a plain
template scored as well as the whole trained branch (Spearman 0.94 between their image scores):
a ratio of 0.1 would have passed that level as healthy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

COLLAPSE_RATIO = 0.2
PROBE_SIZE = 16
# Stored values are rounded: the history is for reading and comparing, not for recomputing.
_DIGITS = 4


def code_usage(indices: torch.Tensor) -> int:
    """Number of distinct codes in ``indices`` (any shape, integer codebook indices)."""
    return int(torch.unique(indices).numel())


def code_perplexity(indices: torch.Tensor, num_codes: int) -> float:
    """exp(entropy) of the code histogram of ``indices`` (any shape): the effective number of
    codes in use, 1 when one code takes every position, ``num_codes`` when all are equally used."""
    counts = torch.bincount(indices.flatten().long(), minlength=num_codes).double()
    p = counts[counts > 0] / counts.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def fixed_share(indices: torch.Tensor) -> float:
    """Share of positions whose code is the same in every image of ``indices`` (B, ...), B ≥ 2.

    Such codes depend on the position, not on the image: they carry no information about it.
    """
    _need_two_images(indices)
    flat = indices.reshape(indices.shape[0], -1)
    return float((flat == flat[:1]).all(dim=0).double().mean())


def relative_std(x: torch.Tensor) -> float:
    """Across-image relative std of ``x`` (B, ...), B ≥ 2 (definition in the module docstring);
    0 for an all-zero batch."""
    _need_two_images(x)
    x = x.detach().double()
    scale = x.square().mean()
    if scale == 0:
        return 0.0
    spread = x.var(dim=0, correction=0).mean()
    return float((spread / scale).sqrt())


def collapsed_levels(
    encoder_std: dict[str, float], decoder_std: dict[str, float], ratio: float = COLLAPSE_RATIO
) -> list[str]:
    """Levels (in ``decoder_std`` order) whose decoder relative std is below ``ratio`` × the
    encoder's. A level whose encoder does not vary across the probe (std 0) cannot be judged
    and is never reported."""
    return [lv for lv, std in decoder_std.items() if std < ratio * encoder_std[lv]]


@torch.no_grad()
def logical_diagnostics(model: nn.Module, probe: torch.Tensor) -> dict[str, Any]:
    """Collapse statistics of ``model`` (a LogicalModel) on ``probe`` (B, 3, H, W), B ≥ 2.

    Runs one forward in eval mode without gradients and restores the model's mode. Returns
    JSON-ready values::

        {"codebooks": {name: {"num_codes", "usage", "perplexity", "fixed_share"}},
         "oce_relative_std": float | None,
         "levels": {level: {"encoder_relative_std", "decoder_relative_std"}},
         "collapsed_levels": [level, ...]}

    Codebooks are named after the decoder stage that holds them (``stages.layer2.vq`` ->
    ``"layer2"``; that codebook quantises the next coarser encoder level); codebooks and levels
    follow ``model.levels`` (fine to coarse). ``oce_relative_std`` is None when the decoder has no
    ``oce``. Use the same probe every epoch so the values compare.
    """
    _need_two_images(probe)
    device = next(model.decoder.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _capture_outputs(model.decoder) as captured:
            encoder, decoder, _ = model.features(probe.to(device))
    finally:
        model.train(was_training)
    encoder_std = {lv: relative_std(f) for lv, f in zip(model.levels, encoder, strict=True)}
    decoder_std = {lv: relative_std(f) for lv, f in zip(model.levels, decoder, strict=True)}
    oce, codebooks = captured.get("oce"), captured["codebooks"]
    rank = {lv: i for i, lv in enumerate(model.levels)}
    return {
        "codebooks": {
            name: _codebook_stats(*codebooks[name])
            for name in sorted(codebooks, key=lambda n: (rank.get(n, len(rank)), n))
        },
        "oce_relative_std": None if oce is None else _round(relative_std(oce)),
        "levels": {
            lv: {
                "encoder_relative_std": _round(encoder_std[lv]),
                "decoder_relative_std": _round(decoder_std[lv]),
            }
            for lv in model.levels
        },
        "collapsed_levels": collapsed_levels(encoder_std, decoder_std),
    }


def format_diagnostics(diagnostics: dict[str, Any]) -> str:
    """One line for the build log, e.g. ``codes layer1 7/16 fixed 10% | decoder/encoder std
    layer1 0.56 | collapsed: none``."""
    codes = " ".join(
        f"{name} {c['usage']}/{c['num_codes']} fixed {c['fixed_share']:.0%}"
        for name, c in diagnostics["codebooks"].items()
    )
    ratios = " ".join(
        f"{lv} {_ratio(s['decoder_relative_std'], s['encoder_relative_std'])}"
        for lv, s in diagnostics["levels"].items()
    )
    collapsed = ", ".join(diagnostics["collapsed_levels"]) or "none"
    return f"codes {codes} | decoder/encoder std {ratios} | collapsed: {collapsed}"


def probe_batch(images: Dataset, fallback: Dataset, size: int = PROBE_SIZE) -> torch.Tensor:
    """The fixed probe: the first ``size`` images of ``images`` (validation images in the build:
    held out, like the images the map will score), completed from ``fallback`` (training
    images) only when there are fewer than the 2 that across-image statistics need.

    Items are ``(image (3, H, W), ...)`` tuples or bare images; returns (B, 3, H, W).
    """
    chosen = [_image(images[i]) for i in range(min(size, len(images)))]
    chosen += [_image(fallback[i]) for i in range(min(2 - len(chosen), len(fallback)))]
    if len(chosen) < 2:
        raise ValueError(f"across-image statistics need at least 2 images, got {len(chosen)}")
    return torch.stack(chosen)


def collapse_warning(diagnostics: dict[str, Any]) -> str | None:
    """The build's warning for a decoder collapsed at some level, or None when none is."""
    levels = diagnostics["collapsed_levels"]
    if not levels:
        return None
    return (
        f"WARNING: the logical decoder has collapsed at {', '.join(levels)}: its output there "
        f"varies across images less than {COLLAPSE_RATIO:g} times as much as the encoder's, so "
        "that level's logical map compares every image with one fixed learned template instead "
        "of a reconstruction of the image, and logical anomalies show there only as distance "
        "from that template. The per-epoch diagnostics are in the manifest's training history; "
        "see docs/ACCURACY.md."
    )


@contextmanager
def _capture_outputs(decoder: nn.Module) -> Iterator[dict[str, Any]]:
    """Hooks recording, for the forwards run inside, the OCE output (``"oce"``) and each
    quantiser's indices (``"codebooks"``: name -> (indices, num_codes)); a module called more
    than once per forward keeps its last call."""
    captured: dict[str, Any] = {"codebooks": {}}
    handles = []

    def keep_indices(name: str, num_codes: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured["codebooks"][name] = (output[1].detach(), num_codes)

        return hook

    def keep_oce(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            captured["oce"] = output.detach()

    try:
        for path, module in decoder.named_modules():
            num_codes = getattr(module, "num_codes", None)
            if isinstance(num_codes, int):
                name = path.removeprefix("stages.").removesuffix(".vq")
                handles.append(module.register_forward_hook(keep_indices(name, num_codes)))
        oce = getattr(decoder, "oce", None)
        if isinstance(oce, nn.Module):
            handles.append(oce.register_forward_hook(keep_oce))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _codebook_stats(indices: torch.Tensor, num_codes: int) -> dict[str, Any]:
    return {
        "num_codes": num_codes,
        "usage": code_usage(indices),
        "perplexity": _round(code_perplexity(indices, num_codes)),
        "fixed_share": _round(fixed_share(indices)),
    }


def _need_two_images(batch: torch.Tensor) -> None:
    if batch.dim() < 1 or batch.shape[0] < 2:
        raise ValueError(
            f"across-image statistics need a batch of at least 2 images, got shape "
            f"{tuple(batch.shape)}"
        )


def _image(item: Any) -> torch.Tensor:
    return item[0] if isinstance(item, tuple | list) else item


def _round(value: float) -> float:
    return round(value, _DIGITS) if math.isfinite(value) else value


def _ratio(decoder: float, encoder: float) -> str:
    return f"{decoder / encoder:.2f}" if encoder > 0 else "n/a"
