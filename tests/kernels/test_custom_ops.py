"""The Triton kernels as ``torch.ops.npgmf`` operators: schema and fakes, compile, export.

Tiny shapes, on CPU under the Triton interpreter (``TRITON_INTERPRET=1``) and on CUDA when
present (the ``device`` fixture). The compile tests use the ``aot_eager`` backend: it runs the
fakes through AOTAutograd as Inductor would, without Inductor's slow C++ compilation on CPU.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels import cosine_maps, gaussian_blur, knn_min, normalize_merge_blur, vq_nearest
from kernels.knn_args import bank_sq_norms

AFFINES = [(1.0, 0.2, 1.5), (0.5, -0.4, 0.3)]
WEIGHTS, MEANS, STDS = (list(column) for column in zip(*AFFINES, strict=True))


@dataclass(frozen=True)
class Case:
    """One operator: test tensors, the op's arguments for them, and the public dispatcher call
    that reaches the op on the Triton path (the PyTorch reference with ``backend="torch"``)."""

    tensors: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    op_args: Callable[..., tuple[Any, ...]]  # (*tensors) -> the op's arguments
    dispatch: Callable[..., Any]  # (*tensors, backend=...) -> the dispatcher's result
    atol: float  # tolerances of the kernel's own tests against its reference
    rtol: float


def _vq_tensors(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(9, 6) vectors near random (5, 6) codewords, so the nearest entry is unambiguous."""
    codebook = torch.randn(5, 6, generator=gen)
    idx = torch.randint(0, 5, (9,), generator=gen)
    return codebook[idx] + 0.01 * torch.randn(9, 6, generator=gen), codebook


def _knn_tensors(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(7, 5) queries, a (20, 5) bank and its (20,) squared norms."""
    bank = torch.randn(20, 5, generator=gen)
    return torch.randn(7, 5, generator=gen), bank, bank_sq_norms(bank)


def _cosine_tensors(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Two levels: encoder 0, encoder 1, decoder 0, decoder 1."""
    shapes = [(2, 3, 4, 4), (2, 5, 2, 2)]
    return tuple(torch.randn(s, generator=gen) for s in shapes + shapes)


def _map_tensors(count: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    """``count`` (2, 7, 6) maps."""
    return lambda gen: tuple(torch.rand(2, 7, 6, generator=gen) for _ in range(count))


CASES = {
    "vq_nearest": Case(
        _vq_tensors,
        lambda x, c: (x, c),
        lambda x, c, backend: vq_nearest(x, c, backend),
        0.0,
        0.0,
    ),
    "knn_min": Case(
        _knn_tensors,
        lambda q, b, b_sq: (q, b, b_sq),
        lambda q, b, b_sq, backend: knn_min(q, b, backend, bank_sq=b_sq),
        1e-3,
        1e-4,
    ),
    "cosine_maps": Case(
        _cosine_tensors,
        lambda e0, e1, d0, d1: ([e0, e1], [d0, d1], [6, 5], True, 1e-8),
        lambda e0, e1, d0, d1, backend: cosine_maps([e0, e1], [d0, d1], (6, 5), backend=backend),
        1e-5,
        1e-5,
    ),
    "gaussian_blur": Case(
        _map_tensors(1),
        lambda x: (x, 1.0, 4.0),
        lambda x, backend: gaussian_blur(x, 1.0, 4.0, backend),
        1e-6,
        1e-5,
    ),
    "normalize_merge_blur": Case(
        _map_tensors(2),
        lambda m0, m1: ([m0, m1], WEIGHTS, MEANS, STDS, 1.0),
        lambda m0, m1, backend: normalize_merge_blur([m0, m1], AFFINES, 1.0, backend),
        1e-5,
        1e-5,
    ),
}

# Variants beyond CASES: (op, tensors -> op arguments), for dtypes and optional arguments.
VARIANTS = {
    "vq_nearest-half-codebook": ("vq_nearest", lambda x, c: (x, c.half())),
    "knn_min-half-queries-no-norms": ("knn_min", lambda q, b, b_sq: (q.half(), b, None)),
    "cosine_maps-half-one-level": (
        "cosine_maps",
        lambda e0, e1, d0, d1: ([e0.half()], [d0.half()], [3, 7], False, 1e-6),
    ),
    "gaussian_blur-half": ("gaussian_blur", lambda x: (x.half(), 0.8, 3.0)),
    "normalize_merge_blur-mixed-dtypes": (
        "normalize_merge_blur",
        lambda m0, m1: ([m0, m1.half()], WEIGHTS, MEANS, STDS, 2.0),
    ),
}
OPCHECK_SAMPLES = {
    **{name: (name, case.op_args) for name, case in CASES.items()},
    **VARIANTS,
}


def _overload(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.npgmf, name).default


def _tensors(name: str, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in CASES[name].tensors(gen))


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_opcheck(device: torch.device, gen: torch.Generator, sample: str) -> None:
    """Schema (no mutation, no output aliasing an input), fake vs real metadata, AOTAutograd with
    dynamic shapes: every default test of ``opcheck`` runs under the interpreter."""
    name, op_args = OPCHECK_SAMPLES[sample]
    torch.library.opcheck(_overload(name), op_args(*_tensors(name, gen, device)))


@pytest.mark.parametrize("name", CASES)
def test_op_matches_reference(device: torch.device, gen: torch.Generator, name: str) -> None:
    case = CASES[name]
    tensors = _tensors(name, gen, device)
    out = _overload(name)(*case.op_args(*tensors))
    reference = case.dispatch(*tensors, backend="torch")
    torch.testing.assert_close(out, reference, atol=case.atol, rtol=case.rtol)


@pytest.mark.parametrize("name", CASES)
def test_compile_sees_the_op_without_graph_breaks(
    device: torch.device, gen: torch.Generator, name: str
) -> None:
    case = CASES[name]
    tensors = _tensors(name, gen, device)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def run(*args: torch.Tensor) -> Any:
        return case.dispatch(*args, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend=record)(*tensors)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert _overload(name) in targets, targets
    torch.testing.assert_close(compiled, run(*tensors), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("name", CASES)
def test_export_keeps_the_op(device: torch.device, gen: torch.Generator, name: str) -> None:
    case = CASES[name]
    tensors = _tensors(name, gen, device)

    class CallsTheKernel(torch.nn.Module):
        def forward(self, *args: torch.Tensor) -> Any:
            return case.dispatch(*args, backend="triton")

    program = torch.export.export(CallsTheKernel(), tensors)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert _overload(name) in targets, targets
    torch.testing.assert_close(
        program.module()(*tensors),
        case.dispatch(*tensors, backend="torch"),
        atol=case.atol,
        rtol=case.rtol,
    )


@pytest.mark.parametrize("name", CASES)
def test_forced_triton_refuses_autograd_before_the_op(
    device: torch.device, gen: torch.Generator, name: str
) -> None:
    """The op has no backward: the dispatcher says so at the call, not later in backward()."""
    tensors = [t.requires_grad_() for t in _tensors(name, gen, device)]
    with pytest.raises(RuntimeError, match=f"{name} has no backward"):
        CASES[name].dispatch(*tensors, backend="triton")


def test_registering_the_ops_needs_no_triton() -> None:
    """kernels.ops imports the Triton modules only inside the op bodies, never at import."""
    source = Path(__file__).resolve().parents[2] / "kernels" / "ops.py"
    top_level = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
        elif isinstance(node, ast.Import):
            top_level.update(alias.name for alias in node.names)
    assert not any("triton" in module for module in top_level), top_level
