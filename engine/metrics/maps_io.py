"""Anomaly maps on disk in the official layout: ``<maps>/<category>/test/<type>/<NNN>.tiff``.

One float32 TIFF per test image at the original resolution, so the official evaluator can read
the same folder. Reading accepts the official extensions (.tif, .tiff, .TIF, .TIFF) and refuses,
naming the file, anything the official evaluator would choke on or silently misread.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from engine.atomic import atomic_file
from engine.data.types import DatasetError, Sample

MAP_EXTENSIONS = (".tiff", ".tif", ".TIFF", ".TIF")


def map_path(maps_root: str | Path, sample: Sample) -> Path:
    """Where :func:`write_map` puts the map of a test sample."""
    if sample.split != "test":
        raise ValueError(f"anomaly maps are stored for test images only, got {sample.image_path}")
    return Path(maps_root) / sample.category / "test" / sample.defect_type / f"{sample.stem}.tiff"


def write_map(path: str | Path, anomaly_map: np.ndarray) -> None:
    """Write one (H, W) map as a float32 TIFF atomically (temp file, then rename)."""
    path = Path(path)
    scores = np.asarray(anomaly_map)
    if scores.ndim != 2 or scores.dtype.kind not in "fiu":
        raise ValueError(
            f"{path}: a map must be a 2-D real array, got {scores.dtype} {scores.shape}"
        )
    encoded = io.BytesIO()  # tifffile wants a named file; the atomic handle is a bare descriptor
    tifffile.imwrite(encoded, scores.astype(np.float32, copy=False))
    with atomic_file(path) as handle:
        handle.write(encoded.getvalue())


def write_maps(
    maps_root: str | Path,
    samples: Sequence[Sample],
    maps: Iterable[np.ndarray],
    progress: bool = True,
) -> list[Path]:
    """Write the map of every test sample; returns the paths written, in sample order."""
    if isinstance(maps, Sized) and len(maps) != len(samples):
        raise ValueError(f"got {len(maps)} maps for {len(samples)} samples")
    written = []
    items = zip(samples, maps, strict=True)
    for sample, anomaly_map in tqdm(
        items, total=len(samples), desc="writing maps", unit="map", disable=not progress
    ):
        path = map_path(maps_root, sample)
        write_map(path, anomaly_map)
        written.append(path)
    return written


def find_map(maps_root: str | Path, sample: Sample) -> Path:
    """The map file of a sample under any accepted extension; exactly one must exist."""
    folder = map_path(maps_root, sample).parent
    found = [folder / f"{sample.stem}{ext}" for ext in MAP_EXTENSIONS]
    found = [p for p in found if p.is_file()]
    if not found:
        raise DatasetError(
            f"missing anomaly map {folder / sample.stem}.tiff for {sample.image_path}"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(f"ambiguous anomaly maps in {folder}: {names}")
    return found[0]


def read_map(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read and validate one map: 2-D, real, finite, and of ``expected_shape`` if given.

    Returns the array in its stored dtype (the official evaluator compares in that precision).
    """
    path = Path(path)
    try:
        scores = tifffile.imread(path)
    except Exception as error:  # tifffile raises many types for truncated or non-TIFF files
        raise DatasetError(f"unreadable anomaly map {path}: {error}") from error
    if scores.size == 0:  # tifffile returns an empty array (and only logs) for a broken header
        raise DatasetError(f"unreadable anomaly map {path}: no pixel data (truncated file?)")
    if scores.ndim != 2:
        raise DatasetError(f"anomaly map {path} must be 2-D, got shape {scores.shape}")
    if scores.dtype.kind not in "fiu":
        raise DatasetError(f"anomaly map {path} must hold real numbers, got dtype {scores.dtype}")
    if expected_shape is not None and scores.shape != tuple(expected_shape):
        raise DatasetError(
            f"anomaly map {path} has shape {scores.shape}, expected {tuple(expected_shape)} "
            "(the original image size: upsample maps before writing them)"
        )
    if not np.all(np.isfinite(scores)):
        raise DatasetError(f"anomaly map {path} contains NaN or Inf")
    return scores


def iter_maps(
    maps_root: str | Path,
    samples: Sequence[Sample],
    expected_shape: tuple[int, int] | None = None,
    progress: bool = True,
) -> Iterator[tuple[Sample, Path, np.ndarray]]:
    """Yield (sample, path, map) for each test sample, one map in memory at a time.

    All maps must share one shape: ``expected_shape`` if given, else the first map's. Before
    reading anything, checks that no map is missing and that no stray map lies in a type
    folder (the official evaluator would score it as an extra test image).
    """
    paths = [find_map(maps_root, sample) for sample in samples]
    expected = {p.resolve() for p in paths}
    for folder in sorted({p.parent for p in paths}):
        stray = sorted(
            p.name
            for p in folder.iterdir()
            if p.suffix in MAP_EXTENSIONS
            and not p.name.startswith(".")  # the official listing skips hidden files
            and p.resolve() not in expected
        )
        if stray:
            raise DatasetError(f"anomaly maps without a test image in {folder}: {stray}")
    shape = expected_shape
    for sample, path in tqdm(
        zip(samples, paths),
        total=len(samples),
        desc="reading maps",
        unit="map",
        disable=not progress,
    ):
        scores = read_map(path, shape)
        shape = scores.shape
        yield sample, path, scores
