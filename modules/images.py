"""Decoded images to 8-bit RGB, whatever their bit depth and transparency."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _to_eight_bits(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images scaled to 0-255 (Pillow's own conversion clips them, so a
    16-bit PNG came out nearly white); float images taken as 0-1 when they stay within it, else as
    0-255 (Pillow's conversion made a 0-1 float TIFF black)."""
    values = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        values = np.nan_to_num(values.astype(np.float64) * scale)
    else:  # I;16*, I: 16-bit samples (PNG), or 32-bit ones beyond that range
        scale = 65535.0 if values.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
        values = values.astype(np.float64) * (255.0 / scale)
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def eight_bit_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: high bit depths scaled, transparency composited on white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_eight_bits(image)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")
