"""BatchNorm folding for deployment: an eval-mode BatchNorm that directly follows a convolution
(plain or transposed) is an affine map of that convolution's output, so it can be merged into
the convolution's weights (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and removed, saving one
elementwise pass per BatchNorm per frame (258 of them in the paper preset's two networks).

Which convolution feeds which BatchNorm is read from one forward pass (the BatchNorm's input
must be the very tensor the convolution returned), not from module names, so it works on any
architecture. A convolution whose output has another consumer too (say a residual sum) would be
folded wrongly: the whole fold is therefore checked against the unfolded outputs on the probe
input and undone when they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]

log = logging.getLogger(__name__)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED)


def _conv_bn_pairs(module: nn.Module, run: Callable[[], object]) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs of ``module`` whose BatchNorm consumed the conv's output
    tensor in one call of ``run``."""
    names = {sub: name for name, sub in module.named_modules()}
    last_output: dict[int, tuple[torch.Tensor, str]] = {}
    pairs: dict[str, str] = {}
    hooks = []

    def after_conv(conv: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        last_output[id(output)] = (output, names[conv])

    def before_bn(bn: nn.Module, inputs: tuple) -> None:
        source = last_output.get(id(inputs[0]))
        if source is not None and source[0] is inputs[0]:
            pairs[names[bn]] = source[1]

    for sub in module.modules():
        if isinstance(sub, _CONVS):
            hooks.append(sub.register_forward_hook(after_conv))
        elif isinstance(sub, _BATCHNORMS):
            hooks.append(sub.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    convs = list(pairs.values())
    # A conv feeding two BatchNorms cannot absorb both.
    return [(conv, bn) for bn, conv in pairs.items() if convs.count(conv) == 1]


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


def fold_batchnorm(
    module: nn.Module,
    run: Callable[[], torch.Tensor],
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    ``run`` calls ``module`` on a probe input and returns a tensor (or a tuple/list/dict of
    them, all checked). Returns the number of BatchNorms folded; 0 (module left as it
    was, with a warning) if the folded outputs differ from the unfolded ones by more than
    ``rtol``/``atol`` (``atol`` in units of each output's largest magnitude, when above 1).
    The module must be in eval mode (folding uses the running statistics).
    """
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (it folds running statistics)")
    with torch.no_grad():
        reference = [t.clone() for t in _tensors(run())]
    if not reference:
        raise TypeError("fold_batchnorm: run() returned no tensor to check the fold against")
    pairs = _conv_bn_pairs(module, run)
    if not pairs:  # nothing to fold (e.g. folded before): skip the checking pass
        return 0
    originals = {name: module.get_submodule(name) for pair in pairs for name in pair}
    for conv_name, bn_name in pairs:
        conv = originals[conv_name]
        fused = fuse_conv_bn_eval(conv, originals[bn_name], transpose=isinstance(conv, _TRANSPOSED))
        _replace(module, conv_name, fused)
        _replace(module, bn_name, nn.Identity())
    with torch.no_grad():
        folded = _tensors(run())
    # float32 rounding of the folded weights grows with the outputs' scale, so atol is relative
    # to each output's largest magnitude (at least 1); a wrong fold is off by the values' order
    if not all(
        f.shape == r.shape
        and torch.allclose(f, r, rtol=rtol, atol=atol * max(1.0, float(r.abs().max())))
        for f, r in zip(folded, reference, strict=True)
    ):
        for name, original in originals.items():
            _replace(module, name, original)
        log.warning(
            "BatchNorm folding changed the outputs beyond rtol=%g, atol=%g; left unfolded",
            rtol,
            atol,
        )
        return 0
    return len(pairs)


def _tensors(output: object) -> list[torch.Tensor]:
    """Every tensor of a tensor, or of a (nested) tuple, list or dict of them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [t for item in output for t in _tensors(item)]
    return []
