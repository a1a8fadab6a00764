"""The artifact manifest: its sealed encoding and its schema (see :mod:`engine.artifact`).

The manifest carries its own sha256 (``manifest_sha256``), computed over the exact bytes of the
file with that value replaced by 64 zeros, so a change to any byte of the manifest is refused
like a change to any byte of the weights. Everything the loader uses is validated here, so a
malformed manifest is an :class:`ArtifactError` naming the field, never a ``KeyError`` or
``TypeError`` from deep inside model construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from engine.calibrate import BRANCHES, BranchStats, FusionConfig
from engine.config import BuildConfig
from engine.manifest_fields import (
    LIMIT,
    REBUILD,
    ArtifactError,
    Fields,
    is_finite,
    is_number,
    untrusted,
)
from engine.models.composition import CompositionConfig
from engine.models.knn_compat import OLD_NAMES, upgrade_identity
from engine.models.knn_index import CHOICES, auto_faiss_specs, is_approximate, parse_params
from engine.models.logical_config import LogicalConfig
from engine.models.positional import PositionalConfig
from engine.models.structural import StructuralConfig
from engine.models.weights import ARCHS, WeightsInfo
from engine.train_config import TrainConfig

# 2: the manifest carries its own sha256; the file set is exact. 3: the structural patch
# projection is saved (version 2 recomputed it at load, and with another thread count it could
# come out in another basis than the memory bank: silently wrong structural scores).
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20

SEAL_KEY = "manifest_sha256"
_SEAL_PLACEHOLDER = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")

LOGICAL_FILE = "logical.pt"
STRUCTURAL_FILE = "structural.pt"
COMPOSITION_FILE = "composition.pt"
POSITIONAL_FILE = "positional.pt"
INDEX_FOLDER = "index"  # only for approximate indexes (is_approximate); exact ones are rebuilt
INDEX_FILES = ("bank.npy", "index.faiss", "index.json")
# structural_index.kind of this version, and of earlier ones with the fields each one records
INDEX_KINDS = ("torch", "faiss")
OLD_INDEX_FIELDS = {
    "faiss_flat": (),
    "faiss_gpu": (),
    "faiss_hnsw": ("m", "ef_construction", "ef_search", "size", "dim"),
    "faiss_ivfpq": ("nlist", "m", "nbits", "nprobe", "size", "dim"),
}

# Bank rows grow with the data (a LOCO-size category at the cpu preset's 384 px: 80 640), so
# they get FAISS's own bound; the files' checksums and sizes bound them in practice.
MAX_BANK_ROWS = (1 << 31) - 1
# Config numbers only the build reads (sample counts, seeds): never bounded by LIMIT.
BUILD_ONLY_KEYS = ("seed", "fit_patches")
MIN_STD = 2.0**-24  # below this a float32 standardisation is meaningless


def _seal_field(digest: str) -> bytes:
    return f'"{SEAL_KEY}": "{digest}"'.encode()


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest file's bytes: indented, sorted JSON carrying its own sha256."""
    if SEAL_KEY in manifest:
        raise ValueError(f"the manifest key {SEAL_KEY!r} is reserved")
    text = json.dumps(
        {**manifest, SEAL_KEY: _SEAL_PLACEHOLDER}, indent=2, sort_keys=True, default=str
    )
    data = (text + "\n").encode()
    placeholder = _seal_field(_SEAL_PLACEHOLDER)
    if data.count(placeholder) != 1:
        raise ValueError(f"the manifest must not contain the text {placeholder!r}")
    return data.replace(placeholder, _seal_field(hashlib.sha256(data).hexdigest()))


def check_seal(data: bytes, manifest: dict[str, Any], where: str) -> None:
    """Raise unless ``data`` (the manifest file) hashes to the ``manifest_sha256`` it carries."""
    claimed = manifest.get(SEAL_KEY)
    field = _seal_field(claimed) if isinstance(claimed, str) else b""
    if not (isinstance(claimed, str) and _HEX64.fullmatch(claimed) and data.count(field) == 1):
        raise ArtifactError(f"{where}: no valid {SEAL_KEY} field; {REBUILD}")
    unsealed = data.replace(field, _seal_field(_SEAL_PLACEHOLDER))
    if hashlib.sha256(unsealed).hexdigest() != claimed:
        raise ArtifactError(
            f"{where}: checksum mismatch (manifest changed or corrupted since the build); {REBUILD}"
        )


def parse_json(data: bytes, where: str) -> Any:
    """JSON from bytes; any decoding problem (bad UTF-8, syntax, huge nesting) is an ArtifactError."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError, JSONDecodeError included
        raise ArtifactError(
            f"{where}: unreadable manifest ({type(error).__name__}: {error})"
        ) from error


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class ManifestSpec:
    """What the loader needs from a validated manifest."""

    config: BuildConfig
    weights: dict[str, WeightsInfo]  # backbones: "logical", "structural"
    stats: dict[str, BranchStats]  # per branch map: "logical", "structural"[, "composition"]
    fusion_weights: dict[str, float]  # per branch map, as calibrated
    composition_grid: tuple[int, int] | None  # the patch grid, when composition is enabled
    text_dim: int | None
    threshold: float
    index: dict[str, Any]  # the structural_index identity, in this version's form
    files: dict[str, FileEntry]
    # per branch map, of its validation image scores: fusion.merge "max" only
    image_stats: dict[str, BranchStats] | None = None
    # the patch grid and the training images it holds, when the positional memory is enabled
    positional_memory: tuple[tuple[int, int], int] | None = None
    # per branch map, the scale of its part below 0: fusion.background_quantile only
    backgrounds: dict[str, float] | None = None


def expected_files(saved_index: bool, composition: bool, positional: bool = False) -> set[str]:
    """The exact set of files an artifact holds (manifest aside), given whether it saves its
    (approximate) kNN index and whether its composition and positional branches are enabled."""
    names = {LOGICAL_FILE, STRUCTURAL_FILE} | ({COMPOSITION_FILE} if composition else set())
    names |= {POSITIONAL_FILE} if positional else set()
    if saved_index:
        names |= {f"{INDEX_FOLDER}/{name}" for name in INDEX_FILES}
    return names


def check_member_name(name: Any, where: str) -> str:
    """``name`` if it is a plain relative POSIX path inside the folder (no ``..``, ``\\``, ``/x``)."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise ArtifactError(
            f"{where}: files entry {name!r} is not a plain relative path inside the artifact "
            f"folder; {REBUILD}"
        )
    return name


def parse_manifest(manifest: Any, where: str) -> ManifestSpec:
    """Validate every field the loader uses (format and seal are checked by the caller)."""
    f = Fields(manifest, where)
    root = f.root
    config = _parse_config(f, f.section(root, "config", "config"))
    weights = {}
    backbones = f.section(root, "backbones", "backbones")
    for branch in ("logical", "structural"):
        weights[branch] = _parse_weights(
            f, f.section(backbones, branch, f"backbones.{branch}"), branch
        )
    enabled = {"positional": config.positional.enabled, "composition": config.composition.enabled}
    branches = tuple(b for b in BRANCHES if enabled.get(b, True))
    calibration = f.section(root, "calibration", "calibration")
    stats = _parse_stats(f, calibration, "calibration", branches)
    image_stats = None
    if config.fusion.merge == "max":
        image_calibration = f.section(root, "image_calibration", "image_calibration")
        image_stats = _parse_stats(f, image_calibration, "image_calibration", branches)
    backgrounds = None
    if config.fusion.equalised_background is not None:
        backgrounds = _parse_scales(
            f, f.section(root, "background_scales", "background_scales"), branches
        )
    fusion = f.section(root, "fusion_weights", "fusion_weights")
    fusion_weights = {
        b: f.number(fusion, b, f"fusion_weights.{b}", low=0.0, high=LIMIT) for b in branches
    }
    if set(fusion) != set(branches):
        raise f.fail("fusion_weights", f"an object with exactly the branches {branches}", fusion)
    if not any(fusion_weights.values()):
        raise f.fail("fusion_weights", "at least one positive weight", fusion)
    grid = None
    if config.composition.enabled:
        grid = _grid(f, f.get(root, "composition_grid", "composition_grid"), "composition_grid")
    positional = _parse_positional(f, root) if config.positional.enabled else None
    threshold = f.number(root, "threshold", "threshold", -math.inf, math.inf)
    text = f.section(root, "text_prior", "text_prior")
    text_dim = None if text.get("dim") is None else f.count(text, "dim", "text_prior.dim")
    if text_dim == 0:
        raise f.fail("text_prior.dim", "null or a positive integer", 0)
    if not isinstance(root.get("category", ""), str):
        raise f.fail("category", "a string", root["category"])
    index = _parse_index(f, f.section(root, "structural_index", "structural_index"), config)
    expected = expected_files(
        is_approximate(index), config.composition.enabled, config.positional.enabled
    )
    files = _parse_files(f, f.section(root, "files", "files"), expected)
    return ManifestSpec(
        config,
        weights,
        stats,
        fusion_weights,
        grid,
        text_dim,
        threshold,
        index,
        files,
        image_stats,
        positional,
        backgrounds,
    )


def _parse_positional(f: Fields, root: dict[str, Any]) -> tuple[tuple[int, int], int]:
    """``positional_memory``: ``{"grid": [h, w], "images": M}``, the memory's shape (M rows per
    cell: the training images, or ``max_images`` of them)."""
    section = f.section(root, "positional_memory", "positional_memory")
    grid = _grid(f, section.get("grid"), "positional_memory.grid")
    images = f.count(section, "images", "positional_memory.images")
    if images == 0 or set(section) != {"grid", "images"}:
        raise f.fail("positional_memory", "exactly a grid and a positive image count", section)
    return grid, images


def _grid(f: Fields, value: Any, field: str) -> tuple[int, int]:
    """A patch grid: two integers in [1, 4096]."""
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(_is_int(v) and 1 <= v <= 4096 for v in value)
    ):
        raise f.fail(field, "two integers in [1, 4096]", value)
    return (value[0], value[1])


def _parse_stats(
    f: Fields, section: dict[str, Any], name: str, branches: tuple[str, ...]
) -> dict[str, BranchStats]:
    """``{branch: {"mean": m, "std": s}}`` for exactly ``branches``."""
    stats = {}
    for branch in branches:
        field = f"{name}.{branch}"
        values = f.section(section, branch, field)
        if set(values) != {"mean", "std"}:
            raise f.fail(field, "an object with exactly 'mean' and 'std'", values)
        mean = f.number(values, "mean", f"{field}.mean")
        stats[branch] = BranchStats(mean, f.number(values, "std", f"{field}.std", low=MIN_STD))
    if set(section) != set(branches):
        raise f.fail(name, f"an object with exactly the branches {branches}", section)
    return stats


def _parse_scales(
    f: Fields, section: dict[str, Any], branches: tuple[str, ...]
) -> dict[str, float]:
    """``{branch: scale}`` for exactly ``branches``, each scale positive."""
    if set(section) != set(branches):
        raise f.fail(
            "background_scales", f"an object with exactly the branches {branches}", section
        )
    return {b: f.number(section, b, f"background_scales.{b}", low=MIN_STD) for b in branches}


def _parse_config(f: Fields, config: dict[str, Any]) -> BuildConfig:
    """Every section present and an object, every value of its field's declared JSON type, the
    numbers inference uses bounded; then the config classes' own validation."""
    _check_types(f, BuildConfig, config, "config")
    config = _with_fields_from_before(config)
    for name, kind in _SECTIONS.items():
        if name in OPTIONAL_SECTIONS and name not in config:
            continue  # an artifact from before the section existed: its defaults apply
        _check_types(f, kind, f.section(config, name, f"config.{name}"), f"config.{name}")
    bad = _out_of_bounds(config)
    if bad is not None:
        raise f.fail(bad[0], f"at most {LIMIT} in size", bad[1])
    with untrusted(f"{f.where}: malformed manifest: config"):
        return BuildConfig.from_dict(config)


def _out_of_bounds(config: dict[str, Any]) -> tuple[str, Any] | None:
    """The first (field, value) of a type-checked config whose number inference cannot take."""
    for name in ("logical", "structural", "fusion", "composition", "positional"):
        for key, value in config.get(name, {}).items():
            items = value if isinstance(value, list) else [value]
            huge = [v for v in items if is_number(v) and not (is_finite(v) and abs(v) <= LIMIT)]
            if huge and not key.endswith(BUILD_ONLY_KEYS):
                return f"config.{name}.{key}", value
    return None


def check_config_bounds(config: BuildConfig) -> None:
    """Raise ValueError for a setting an artifact would refuse to record, before a build works."""
    bad = _out_of_bounds(config.to_dict())
    if bad is not None:
        field, value = bad
        raise ValueError(
            f"{field.removeprefix('config.')}={value!r}: an artifact records settings of at most "
            f"{LIMIT} in size (settings ending in {' or '.join(BUILD_ONLY_KEYS)} aside)"
        )


# Config sections added after format 3 was fixed; a manifest without one gets its defaults.
OPTIONAL_SECTIONS = ("positional",)
# Fields added since whose default is not what an artifact without them was fitted with.
FIELDS_FROM_BEFORE = {"composition": {"unseen_scale": 0.0}}


def _with_fields_from_before(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the value a field had before it existed, where a section lacks it."""
    out = dict(config)
    for section, before in FIELDS_FROM_BEFORE.items():
        if isinstance(out.get(section), dict):
            out[section] = before | out[section]
    return out


_SECTIONS = {
    "composition": CompositionConfig,
    "positional": PositionalConfig,
    "logical": LogicalConfig,
    "structural": StructuralConfig,
    "train": TrainConfig,
    "fusion": FusionConfig,
}


def _is_int(value: Any) -> bool:
    return type(value) is int


def _list_of(check: Any, length: int | None = None) -> Any:
    return lambda v: (
        isinstance(v, list) and (length is None or len(v) == length) and all(map(check, v))
    )


# JSON checks for the field annotations the config classes use (as strings: `from __future__
# import annotations`); a field of another annotation is left to the class's own validation.
_JSON_TYPES: dict[str, tuple[str, Any]] = {
    "int": ("an integer", _is_int),
    "float": ("a finite number", is_finite),
    "bool": ("true or false", lambda v: type(v) is bool),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str | None": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "int | None": ("an integer or null", lambda v: v is None or _is_int(v)),
    "tuple[int, ...]": ("a list of integers", _list_of(_is_int)),
    "tuple[str, ...]": ("a list of strings", _list_of(lambda v: isinstance(v, str))),
    "tuple[float, float]": ("a list of 2 finite numbers", _list_of(is_finite, 2)),
}


def _check_types(f: Fields, kind: type, values: dict[str, Any], where: str) -> None:
    for field in fields(kind):
        wanted = _JSON_TYPES.get(field.type) if isinstance(field.type, str) else None
        if wanted is not None and field.name in values and not wanted[1](values[field.name]):
            raise f.fail(f"{where}.{field.name}", wanted[0], values[field.name])


def _parse_weights(f: Fields, values: dict[str, Any], branch: str) -> WeightsInfo:
    field = f"backbones.{branch}"
    for key in ("requested_arch", "source", "note"):
        if not isinstance(f.get(values, key, f"{field}.{key}"), str):
            raise f.fail(f"{field}.{key}", "a string", values[key])
    if f.get(values, "arch", f"{field}.arch") not in ARCHS:
        raise f.fail(f"{field}.arch", f"one of {ARCHS}", values["arch"])
    for key in ("path", "sha256"):
        if not isinstance(f.get(values, key, f"{field}.{key}"), str | None):
            raise f.fail(f"{field}.{key}", "a string or null", values[key])
    norm = {}
    for key, low in (("mean", -LIMIT), ("std", MIN_STD)):
        value = f.get(values, key, f"{field}.{key}")
        if not (isinstance(value, list) and len(value) == 3):
            raise f.fail(f"{field}.{key}", "a list of 3 numbers", value)
        items = dict(enumerate(value))
        norm[key] = tuple(f.number(items, i, f"{field}.{key}[{i}]", low) for i in range(3))
    known = {"requested_arch", "arch", "source", "path", "sha256", "mean", "std", "note"}
    if set(values) != known:
        raise f.fail(field, f"an object with exactly the keys {sorted(known)}", sorted(values))
    return WeightsInfo(**{**values, **norm})


def _parse_index(f: Fields, index: dict[str, Any], config: BuildConfig) -> dict[str, Any]:
    """The structural_index identity, checked and in this version's form (an earlier version's
    converted), consistent with config.structural.index."""
    kind = f.get(index, "kind", "structural_index.kind")
    if kind == "faiss":
        _check_faiss_identity(f, index)
    elif kind != "torch" and (not isinstance(kind, str) or kind not in OLD_INDEX_FIELDS):
        raise f.fail(
            "structural_index.kind", f"one of {INDEX_KINDS + tuple(OLD_INDEX_FIELDS)}", kind
        )
    for key in ("size", "dim") if kind == "faiss" else OLD_INDEX_FIELDS.get(kind, ()):
        high = MAX_BANK_ROWS if key == "size" else LIMIT
        if f.count(index, key, f"structural_index.{key}", high) < 1:
            raise f.fail(f"structural_index.{key}", "positive", index[key])
    upgraded = upgrade_identity(index)
    # The spec the build asked for: an earlier version's kind stands for its default spec.
    built = OLD_NAMES.get(kind) or upgraded.get("spec", "torch")
    wanted = config.structural.index
    allowed, shown = (wanted,), repr(wanted)
    if wanted == "auto" and is_approximate(upgraded):
        # What a build on a CPU chooses, or chose in an earlier version, for this bank.
        allowed = auto_faiss_specs(upgraded["size"], upgraded["dim"])
        picks = " or ".join(map(repr, allowed))
        shown = f"'auto' (on a CPU {picks} for {upgraded['size']} bank rows)"
    if (is_approximate(upgraded) or wanted not in CHOICES) and built not in allowed:
        raise f.fail(
            "structural_index",
            f"an index consistent with config.structural.index={shown}",
            index,
        )
    return upgraded


def _check_faiss_identity(f: Fields, index: dict[str, Any]) -> None:
    for key in ("spec", "params"):
        if not isinstance(f.get(index, key, f"structural_index.{key}"), str):
            raise f.fail(f"structural_index.{key}", "a string", index[key])
    try:
        parse_params(index["params"])
    except ValueError as error:
        raise f.fail(
            "structural_index.params", f"FAISS parameters ({error})", index["params"]
        ) from None
    if type(f.get(index, "exact", "structural_index.exact")) is not bool:
        raise f.fail("structural_index.exact", "true or false", index["exact"])


def _parse_files(f: Fields, files: dict[str, Any], expected: set[str]) -> dict[str, FileEntry]:
    out = {}
    for name, meta in files.items():
        check_member_name(name, f.where)
        field = f"files[{name!r}]"
        meta = f.dict(meta, field)
        if set(meta) != {"sha256", "bytes"}:
            raise f.fail(field, "an object with exactly 'sha256' and 'bytes'", meta)
        digest, size = meta["sha256"], meta["bytes"]
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise f.fail(f"{field}.sha256", "64 lowercase hex digits", digest)
        if type(size) is not int or size < 0:
            raise f.fail(f"{field}.bytes", "a non-negative integer", size)
        out[name] = FileEntry(digest, size)
    if set(out) != expected:
        missing, extra = sorted(expected - set(out)), sorted(set(out) - expected)
        raise ArtifactError(
            f"{f.where}: malformed manifest: files must list exactly {sorted(expected)} "
            f"(not listed: {missing}, unexpected: {extra}); {REBUILD}"
        )
    return out


def some_names(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, quoted, and how many more: for error messages."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more
