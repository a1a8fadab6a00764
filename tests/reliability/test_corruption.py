"""Any single byte of an artifact changed, in the manifest or in any weight or index file,
is refused with an ArtifactError (seeded random positions, plus each file's first and last)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.artifact import ArtifactError, load_artifact

POSITIONS_PER_FILE = 6


@pytest.fixture(scope="module")
def ivfpq_source(tiny) -> tuple:
    return tiny["tiny_detector"](2, index="IVF2,PQ2x4", params="nprobe=2")


@pytest.mark.parametrize("index", ["torch", "IVF2,PQ2x4"])
def test_any_changed_byte_is_refused(
    tmp_path: Path, sources: dict, faults, tiny, ivfpq_source, index: str
) -> None:
    path = tmp_path / "art"
    if index == "torch":
        faults.write_copy(path, sources["A"])
    else:
        tiny["save"](path, *ivfpq_source)
    rng = random.Random(f"corrupt-{index}")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    assert len(files) == (3 if index == "torch" else 6)
    for file in files:
        original = file.read_bytes()
        positions = {0, len(original) - 1, *rng.sample(range(len(original)), POSITIONS_PER_FILE)}
        for position in sorted(positions):
            corrupted = bytearray(original)
            corrupted[position] = (original[position] + rng.randrange(1, 256)) % 256
            file.write_bytes(bytes(corrupted))
            with pytest.raises(ArtifactError):
                load_artifact(path)
        file.write_bytes(original)
    load_artifact(path)  # intact again: the refusals were about the corruption
