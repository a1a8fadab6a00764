"""NPGMF anomaly detection engine: logical + structural branches, fused into one anomaly map.

``engine.Runtime`` and ``engine.overlay`` are imported on first use, so ``import engine`` stays
light (no torch) for tools that only need the version.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Runtime", "SourceLost", "overlay"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from engine.runtime import Runtime

        return Runtime
    if name == "SourceLost":
        from engine.runtime import SourceLost

        return SourceLost
    if name == "overlay":
        from engine.display import overlay

        return overlay
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
