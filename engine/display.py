"""Draw a result on its frame for display: the anomalous region tinted and outlined, verdict and
score in a banner scaled to the frame (legible from a couple of metres on any frame size)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from engine.runtime import COLORS, Result, check_frame

_OK = (40, 180, 60)
_ALARM = (230, 40, 40)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its boundary (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def overlay(
    frame: np.ndarray,
    result: Result,
    color: str = "bgr",
    alpha: float = 0.45,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """uint8 (H, W, 3) frame in ``color`` order -> uint8 (H, W, 3) in the same order.

    The map is coloured with ``jet`` between ``vmin`` (default: the map's minimum) and ``vmax``
    (default: the larger of the decision threshold and the map's maximum). The tint fades in
    between halfway to the threshold and the threshold, so normal areas keep their true colours,
    and reaches ``alpha`` at the threshold; :attr:`Result.mask` (pixels above the threshold) is
    outlined. A banner, its text a twentieth of the frame's height, shows the verdict.
    """
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    frame = check_frame(frame)
    anomaly_map = result.anomaly_map
    if anomaly_map.shape != frame.shape[:2]:
        raise ValueError(
            f"the result's map {anomaly_map.shape} does not match the frame {frame.shape[:2]}"
        )
    rgb = frame[..., ::-1] if color == "bgr" else frame
    low = float(anomaly_map.min()) if vmin is None else vmin
    high = max(float(anomaly_map.max()), result.threshold) if vmax is None else vmax
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = colormaps["jet"](scaled)[..., :3] * 255.0
    start = low + (result.threshold - low) / 2
    weight = alpha * np.clip((anomaly_map - start) / max(result.threshold - start, 1e-12), 0, 1)
    blended = (1 - weight[..., None]) * rgb + weight[..., None] * heat
    height, width = anomaly_map.shape
    edge = _outline(result.mask, max(1, min(height, width) // 250))
    blended[edge] = 255.0
    image = Image.fromarray(blended.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    verdict = "ANOMALY" if result.is_anomalous else "OK"
    text = f"{verdict}  score {result.score:.2f}  {result.latency_ms:.0f} ms"
    font = ImageFont.load_default(size=max(10, height // 20))
    pad = max(4, height // 100)
    box = draw.textbbox((pad, pad), text, font=font)
    draw.rectangle((0, 0, box[2] + pad, box[3] + pad), fill=_ALARM if result.is_anomalous else _OK)
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
    out = np.asarray(image)
    return np.ascontiguousarray(out[..., ::-1] if color == "bgr" else out)
