"""Test-wide setup.

Without a GPU, Triton kernels run under the CPU interpreter. ``TRITON_INTERPRET`` is read when a
kernel is decorated, so it must be set before any kernel module is imported: here, first.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


# Settings of the end-to-end build used by tests/test_build.py and tests/test_runtime.py: tiny
# enough for a couple of minutes on 2 CPU cores, real enough to exercise every step.
TINY_BUILD_ARGS = [
    "--text-prior=learned",
    "--epochs=1",
    "--preset=cpu",
    "--device=cpu",
    "--no-progress",
    "--set=logical.image_size=64",
    "--set=structural.image_size=64",
    "--set=structural.feature_dim=32",
    "--set=train.batch_size=4",
]


@pytest.fixture(scope="session")
def tiny_build_args() -> list[str]:
    return list(TINY_BUILD_ARGS)


@pytest.fixture(scope="session")
def tiny_loco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic pushpins category (8 train, 4 validation, 3 per test type)."""
    from engine.data.synthetic import generate_category

    root = tmp_path_factory.mktemp("loco")
    generate_category(
        root,
        "pushpins",
        seed=1,
        size=(170, 100),
        n_train=8,
        n_validation=4,
        n_test_good=3,
        n_logical=3,
        n_structural=3,
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, tiny_loco: Path) -> dict[str, Path]:
    """``python -m engine.build`` on :func:`tiny_loco`: the artifact and the saved fused maps."""
    from engine.build import main

    work = tmp_path_factory.mktemp("build")
    artifact, maps = work / "artifact", work / "maps"
    argv = ["--category=pushpins", f"--data-root={tiny_loco}", f"--out={artifact}"]
    argv += [f"--save-maps={maps}", *TINY_BUILD_ARGS]
    assert main(argv) == 0
    return {"artifact": artifact, "maps": maps, "data": tiny_loco}
