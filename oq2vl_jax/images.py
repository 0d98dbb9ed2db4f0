"""The one image preprocessing of the system (docs/original_system.md §1, "resize-naive"), shared by packing, loading,
the model and generation: RGB, PIL bicubic squash to size x size (aspect ratio ignored), then
(x / 255 - 0.5) / 0.5 into [-1, 1]."""

from __future__ import annotations

import numpy as np

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_BIT_DEPTH = _SIXTEEN_BIT + ("I", "F")  # greyscale modes that convert("RGB") would clip


def to_rgb8(im):
    """PIL image of any mode -> 8-bit RGB PIL image, high-bit-depth values scaled, never clipped.

    PIL's own convert("RGB") clips 16/32-bit greyscale at 255 (a 16-bit scan becomes all white).
    Here 16-bit greyscale (I;16*) keeps its top 8 bits (v >> 8), as PIL already does for 16-bit RGB
    PNGs, which it opens as 8-bit RGB. 32-bit integer greyscale (I) with values <= 255 is taken as
    8-bit, <= 65535 as 16-bit (older Pillow opens 16-bit PNGs as I), larger by its maximum.
    Float greyscale (F) in [0, 1] is scaled by 255, within [0, 255] kept, larger by its maximum.
    """
    from PIL import Image

    if im.mode not in _SIXTEEN_BIT + ("I", "F"):
        return im.convert("RGB")  # a loaded copy even for RGB: callers close the file right after
    x = np.asarray(im)
    if im.mode in _SIXTEEN_BIT:
        grey = (x.astype(np.uint16) >> 8).astype(np.uint8)
    else:
        x = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        x = np.maximum(x, 0.0)
        top = float(x.max(initial=0.0))
        if im.mode == "I":
            if top <= 255:
                scaled = x
            elif top <= 65535:
                scaled = np.floor(x / 256.0)
            else:
                scaled = x * (255.0 / top)
        else:
            scaled = x * 255.0 if top <= 1.0 else (x if top <= 255 else x * (255.0 / top))
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def squash(im, size: int):
    """PIL image -> RGB PIL image of size x size (bicubic, aspect ratio ignored)."""
    from PIL import Image

    return to_rgb8(im).resize((size, size), Image.BICUBIC)


def normalize(pixels):
    """uint8 pixels (numpy or jax array) -> float32 in [-1, 1], as SigLIP's mean = std = 0.5."""
    return (pixels.astype("float32") / 255.0 - 0.5) / 0.5
