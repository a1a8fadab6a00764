"""Draw a result on its frame for display: heat map blended in, verdict and score written on top."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from engine.runtime import COLORS, Result, check_frame

_OK = (40, 180, 60)
_ALARM = (230, 40, 40)


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
    (default: the larger of the decision threshold and the map's maximum, so a normal frame stays
    cool and an alarm shows red), blended with weight ``alpha``; a banner shows the verdict.
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
    heat = (colormaps["jet"](scaled)[..., :3] * 255.0).astype(np.float32)
    blended = ((1 - alpha) * rgb.astype(np.float32) + alpha * heat).round().astype(np.uint8)

    image = Image.fromarray(blended)
    draw = ImageDraw.Draw(image)
    verdict = "ANOMALY" if result.is_anomalous else "OK"
    text = f"{verdict}  score {result.score:.2f}  {result.latency_ms:.0f} ms"
    box = draw.textbbox((0, 0), text)
    draw.rectangle((0, 0, box[2] + 8, box[3] + 8), fill=_ALARM if result.is_anomalous else _OK)
    draw.text((4, 4), text, fill=(255, 255, 255))
    out = np.asarray(image)
    return np.ascontiguousarray(out[..., ::-1] if color == "bgr" else out)
