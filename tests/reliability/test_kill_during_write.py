"""A writer SIGKILLed at any moment leaves the old or the new artifact, complete, at the path,
no other visible entry beside it, and the next write removes what the dead writer left."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from engine import artifact_files
from engine.artifact import ArtifactWriter, load_artifact

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# The filesystem steps of one write: fsync of logical.pt, structural.pt, the manifest and the
# folder, the swap (one exchange, or in the fallback the exchange attempt and two renames), the
# parent's fsync, removing the previous folder: 7 steps, 9 in the fallback.
KILL_STEPS = range(1, 10)


def _kill_self_at(step: int, fallback: bool) -> None:
    """In the child: die by SIGKILL just before the ``step``-th filesystem step of the writes."""
    calls = itertools.count(1)

    def hooked(function):
        def wrapper(*args, **kwargs):
            if next(calls) == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapper

    exchange = (lambda a, b: False) if fallback else artifact_files.exchange
    artifact_files.exchange = hooked(exchange)
    os.fsync, os.replace, shutil.rmtree = map(hooked, (os.fsync, os.replace, shutil.rmtree))


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _next_write_cleans_up(path: Path, sources: dict, faults) -> None:
    faults.write_copy(path, sources["A"])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("step", KILL_STEPS)
def test_kill_at_each_step_of_a_swap(tmp_path: Path, sources: dict, faults, step: int) -> None:
    path = tmp_path / "art"
    faults.write_copy(path, sources["B"])
    pid = faults.fork(lambda: (_kill_self_at(step, False), faults.write_forever(path, sources)))
    assert _killed(os.waitpid(pid, 0)[1])
    faults.assert_one_complete_build(path, sources)
    _next_write_cleans_up(path, sources, faults)


@pytest.mark.parametrize("step", KILL_STEPS)
def test_kill_during_two_rename_fallback(tmp_path: Path, sources: dict, faults, step: int) -> None:
    """Without an atomic exchange a kill between the renames hides the old artifact for a
    moment; the next writer puts it back before doing anything else."""
    path = tmp_path / "art"
    faults.write_copy(path, sources["B"])
    pid = faults.fork(lambda: (_kill_self_at(step, True), faults.write_forever(path, sources)))
    assert _killed(os.waitpid(pid, 0)[1])
    with pytest.raises(RuntimeError), ArtifactWriter(path):
        raise RuntimeError("the next build fails before writing anything")
    faults.assert_one_complete_build(path, sources)
    _next_write_cleans_up(path, sources, faults)


def test_kill_at_random_moments(tmp_path: Path, sources: dict, faults, tiny) -> None:
    path, rng = tmp_path / "art", random.Random(10)
    faults.write_copy(path, sources["B"])
    for _ in range(8):
        pid = faults.fork(lambda: faults.write_forever(path, sources))
        time.sleep(rng.uniform(0.0, 0.3))
        assert _killed(faults.kill(pid))
        faults.assert_one_complete_build(path, sources)
    detector, manifest = load_artifact(path)
    assert tiny["fingerprint"](detector) == sources[manifest["marker"]]["fingerprint"]
    _next_write_cleans_up(path, sources, faults)
