from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.data.types import GOOD, LOGICAL, DatasetError, Sample
from engine.metrics.maps_io import find_map, iter_maps, map_path, read_map, write_map, write_maps

CATEGORY = "widgets"
SHAPE = (6, 8)


def sample(defect_type: str, stem: str, split: str = "test") -> Sample:
    return Sample(
        CATEGORY, split, defect_type, Path(f"/data/{CATEGORY}/{split}/{defect_type}/{stem}.png")
    )


SAMPLES = [sample(GOOD, "000"), sample(GOOD, "001"), sample(LOGICAL, "000")]


def random_maps(count: int = len(SAMPLES)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(SHAPE, dtype=np.float32) for _ in range(count)]


def test_round_trip_in_the_official_layout(tmp_path):
    maps = random_maps()
    written = write_maps(tmp_path, SAMPLES, maps, progress=False)
    assert written[2] == tmp_path / CATEGORY / "test" / LOGICAL / "000.tiff"
    read = list(iter_maps(tmp_path, SAMPLES, SHAPE, progress=False))
    assert [(s, p) for s, p, _ in read] == list(zip(SAMPLES, written))
    for (_, _, got), expected in zip(read, maps):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
    # Atomic writes leave no temporary file behind.
    assert sorted(p.name for p in (tmp_path / CATEGORY / "test" / GOOD).iterdir()) == [
        "000.tiff",
        "001.tiff",
    ]


def test_float64_maps_are_stored_as_float32(tmp_path):
    path = tmp_path / "map.tiff"
    write_map(path, np.full(SHAPE, 1 / 3))
    stored = tifffile.imread(path)
    assert stored.dtype == np.float32 and stored[0, 0] == np.float32(1 / 3)


@pytest.mark.parametrize("extension", [".tif", ".TIF", ".TIFF"])
def test_official_extensions_are_accepted(tmp_path, extension):
    folder = tmp_path / CATEGORY / "test" / GOOD
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / f"000{extension}", np.ones(SHAPE, np.float32))
    assert find_map(tmp_path, SAMPLES[0]) == folder / f"000{extension}"
    np.testing.assert_array_equal(read_map(folder / f"000{extension}"), 1.0)


def test_missing_map_is_named(tmp_path):
    write_maps(tmp_path, SAMPLES[:2], random_maps(2), progress=False)
    expected = tmp_path / CATEGORY / "test" / LOGICAL / "000.tiff"
    with pytest.raises(DatasetError, match=f"missing anomaly map {expected}"):
        list(iter_maps(tmp_path, SAMPLES, progress=False))


def test_two_extensions_of_one_map_are_ambiguous(tmp_path):
    write_maps(tmp_path, SAMPLES[:1], random_maps(1), progress=False)
    folder = tmp_path / CATEGORY / "test" / GOOD
    tifffile.imwrite(folder / "000.tif", np.ones(SHAPE, np.float32))
    with pytest.raises(DatasetError, match="ambiguous anomaly maps"):
        find_map(tmp_path, SAMPLES[0])


def test_stray_map_is_refused_before_reading(tmp_path):
    write_maps(tmp_path, SAMPLES, random_maps(), progress=False)
    stray = tmp_path / CATEGORY / "test" / GOOD / "007.tiff"
    tifffile.imwrite(stray, np.ones(SHAPE, np.float32))
    (tmp_path / CATEGORY / "test" / GOOD / ".hidden.tiff").write_bytes(b"ignored")
    with pytest.raises(DatasetError, match=r"without a test image .*007\.tiff"):
        next(iter_maps(tmp_path, SAMPLES, progress=False))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, *SHAPE), np.float32), "must be 2-D"),
        (np.zeros((4, 4), np.float32), r"has shape \(4, 4\), expected \(6, 8\)"),
        (np.full(SHAPE, np.nan, np.float32), "NaN or Inf"),
        (np.full(SHAPE, -np.inf, np.float32), "NaN or Inf"),
        (np.zeros(SHAPE, np.complex64), "real numbers"),
    ],
)
def test_bad_maps_are_refused_naming_the_file(tmp_path, array, message):
    path = tmp_path / "bad.tiff"
    tifffile.imwrite(path, array)
    with pytest.raises(DatasetError, match=message) as error:
        read_map(path, SHAPE)
    assert str(path) in str(error.value)


def test_later_map_of_another_shape_is_refused(tmp_path):
    maps = [*random_maps(2), np.zeros((3, 3), np.float32)]
    write_maps(tmp_path, SAMPLES, maps, progress=False)
    with pytest.raises(DatasetError, match=r"000\.tiff has shape \(3, 3\), expected \(6, 8\)"):
        list(iter_maps(tmp_path, SAMPLES, progress=False))


@pytest.mark.parametrize("content", [b"II*\x00garbage", b"not a tiff at all", b""])
def test_unreadable_file_is_named(tmp_path, content):
    path = tmp_path / "broken.tiff"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=f"unreadable anomaly map {path}"):
        read_map(path)


def test_integer_maps_are_read_in_their_dtype(tmp_path):
    path = tmp_path / "counts.tiff"
    tifffile.imwrite(path, np.arange(48, dtype=np.uint16).reshape(SHAPE))
    assert read_map(path).dtype == np.uint16


def test_bad_write_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="2-D real array"):
        write_map(tmp_path / "x.tiff", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="2-D real array"):
        write_map(tmp_path / "x.tiff", np.zeros((2, 2), dtype=complex))
    with pytest.raises(ValueError, match="test images only"):
        map_path(tmp_path, sample(GOOD, "000", split="train"))
    with pytest.raises(ValueError, match="got 2 maps for 1 samples"):
        write_maps(tmp_path, SAMPLES[:1], random_maps(2), progress=False)
    assert not any(tmp_path.rglob("*.tiff*"))
