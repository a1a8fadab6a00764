"""The operating point of a built artifact: its threshold, changed without a rebuild.

The build calibrates the threshold so that a target share of validation good images (default
5 %) scores above it (:func:`engine.calibrate.calibrate_threshold`) and stores those validation
scores in the manifest. :func:`set_threshold` writes a new threshold into an artifact: the
artifact is rewritten through the same atomic, sealed path as a build, and nothing but the
threshold and the manifest's checksum changes. A Runtime loaded afterwards uses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from engine import artifact_files as fs
from engine.artifact import ArtifactError, ArtifactWriter, read_manifest
from engine.artifact_manifest import SEAL_KEY
from engine.calibrate import finite_threshold

__all__ = ["false_alarm_rate", "operating_point_lines", "set_threshold"]


def false_alarm_rate(good_scores: np.ndarray | list[float], threshold: float) -> float:
    """Share of good images scoring above ``threshold`` (what the threshold would reject)."""
    scores = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("no good-image scores")
    return float((scores > threshold).mean())


def operating_point_lines(
    scores: np.ndarray, defects: list[str], threshold: float, target_far: float
) -> list[str]:
    """What the threshold does on the test images: false alarms on good ones, recall per defect
    type and overall, and the confusion counts. ``scores`` (N,) and ``defects`` (N,) are the
    test images' fused scores and defect names (``good`` for good ones)."""
    scores = np.asarray(scores, dtype=np.float64)
    names = np.asarray(defects)
    flagged = scores > threshold
    good = names == "good"
    lines = [
        f"threshold {threshold:.4g}: rejects at most {target_far:.0%} of validation good images "
        "(score = max of the fused map; python -m tools.threshold changes it)"
    ]
    if good.any():
        lines.append(
            f"  test good: {flagged[good].sum()}/{good.sum()} rejected "
            f"(false-alarm rate {flagged[good].mean():.1%})"
        )
    caught = []
    for name in sorted(set(names[~good])):
        chosen = names == name
        caught.append(f"{name} {flagged[chosen].sum()}/{chosen.sum()}")
    if caught:
        bad = ~good
        lines.append(f"  caught per defect type: {', '.join(caught)}")
        lines.append(
            f"  confusion: {flagged[bad].sum()} anomalies caught, {(~flagged[bad]).sum()} missed, "
            f"{flagged[good].sum()} false alarms, {(~flagged[good]).sum()} good passed "
            f"(recall {flagged[bad].mean():.1%})"
        )
    return lines


def set_threshold(path: str | Path, threshold: float) -> dict[str, Any]:
    """Write ``threshold`` into the artifact at ``path`` (verified first); returns the new
    manifest. Raises ValueError for a non-finite threshold and ArtifactError for a bad artifact,
    in both cases leaving the artifact as it was."""
    threshold = finite_threshold(threshold)
    root = Path(path)
    manifest = read_manifest(root, verify=True)
    kept = {k: v for k, v in manifest.items() if k not in (SEAL_KEY, "files", "format_version")}
    with ArtifactWriter(root) as writer:
        for name, entry in manifest["files"].items():
            copy = writer.file(name)
            shutil.copyfile(root / name, copy)
            # A rebuild may have replaced the artifact since the manifest was read.
            if fs.hash_and_sync(copy) != (entry["sha256"], entry["bytes"]):
                raise ArtifactError(f"{root / name} changed while the threshold was being set")
        writer.commit({**kept, "threshold": threshold})
    # The files were hashed just now, while being copied: the seal and file set suffice.
    return read_manifest(root, verify=False)
