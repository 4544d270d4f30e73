"""Image helpers for drawing: the Grad-CAM overlay."""

from __future__ import annotations

import numpy as np
from PIL import Image

# A small "jet"-like colour map (blue → cyan → yellow → red), no matplotlib needed.
_STOPS = np.array([[0.0, 0, 0, 130], [0.25, 0, 110, 255], [0.5, 60, 220, 200],
                   [0.75, 255, 210, 0], [1.0, 220, 20, 20]])


def colorize(heat: np.ndarray) -> np.ndarray:
    """A (H, W) array in 0..1 as (H, W, 3) uint8 colours."""
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=float)), 0, 1)
    out = np.empty(heat.shape + (3,), dtype=float)
    for c in range(3):
        out[..., c] = np.interp(heat, _STOPS[:, 0], _STOPS[:, c + 1])
    return out.astype(np.uint8)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map (any size, any range) over an RGB image of its own size."""
    heat = np.asarray(heatmap, dtype=float)
    if heat.ndim == 3:
        heat = heat[..., 0] if heat.shape[-1] == 1 else heat.mean(axis=-1)
    lo, hi = float(np.min(heat)), float(np.max(heat))
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    h, w = image_uint8.shape[:2]
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    colours = colorize(np.asarray(heat_img, dtype=float) / 255.0)
    blended = (1 - alpha) * image_uint8[..., :3].astype(float) + alpha * colours.astype(float)
    return np.clip(blended, 0, 255).astype(np.uint8)
