"""Typed, bounded access to an artifact manifest's untrusted JSON, and the one error type
every problem with an artifact becomes (:class:`ArtifactError`, naming the field or file)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Plausibility bounds on the numbers inference uses. No real setting, statistic or
# normalisation comes near them; a hand-edited manifest could otherwise make model
# construction loop or allocate without bound, or inference overflow to inf/NaN.
LIMIT = 1 << 16  # |config numbers| (BUILD_ONLY_KEYS aside), |means|, stds, sizes

REBUILD = "rebuild the artifact with `python -m engine.build`"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, malformed, from another format, or fails a checksum;
    or a build's output path holds something that is not an artifact."""


@contextmanager
def untrusted(what: str) -> Iterator[None]:
    """Turn any exception raised while ``what`` (on artifact data) into an :class:`ArtifactError`.

    Deserialisers and model constructors fed with artifact data raise whatever their input
    provokes (``UnpicklingError``, ``EOFError``, ``RuntimeError`` for shape mismatches, ...);
    none of those is part of their contract, and the caller must see one error type.
    """
    try:
        yield
    except ArtifactError:
        raise
    except Exception as error:
        raise ArtifactError(f"{what} ({type(error).__name__}: {error}); {REBUILD}") from error


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class Fields:
    """Typed access to the manifest's fields; every failure names the field."""

    def __init__(self, manifest: Any, where: str) -> None:
        self.where = where
        self.root = self.dict(manifest, "the manifest")

    def fail(self, field: str, wanted: str, value: Any) -> ArtifactError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ArtifactError(
            f"{self.where}: malformed manifest: {field} must be {wanted}, got {shown}; {REBUILD}"
        )

    def dict(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "an object", value)
        return value

    def get(self, parent: dict[str, Any], key: str, field: str) -> Any:
        if key not in parent:
            raise ArtifactError(f"{self.where}: malformed manifest: {field} is missing; {REBUILD}")
        return parent[key]

    def section(self, parent: dict[str, Any], key: str, field: str) -> dict[str, Any]:
        return self.dict(self.get(parent, key, field), field)

    def number(
        self,
        parent: dict[str, Any],
        key: str,
        field: str,
        low: float = -LIMIT,
        high: float = LIMIT,
    ) -> float:
        value = self.get(parent, key, field)
        if not (is_finite(value) and low <= value <= high):
            bounds = "" if math.isinf(low) and math.isinf(high) else f" in [{low:g}, {high:g}]"
            raise self.fail(field, f"a finite number{bounds}", value)
        return float(value)

    def count(self, parent: dict[str, Any], key: str, field: str, high: int = LIMIT) -> int:
        value = self.get(parent, key, field)
        if type(value) is not int or not 0 <= value <= high:
            raise self.fail(field, f"an integer in [0, {high}]", value)
        return value
