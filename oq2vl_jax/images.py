"""The one image preprocessing of the system (docs/original_system.md §1, "resize-naive"), shared by packing, loading,
the model and generation: RGB, PIL bicubic squash to size x size (aspect ratio ignored), then
(x / 255 - 0.5) / 0.5 into [-1, 1]."""

from __future__ import annotations


def squash(im, size: int):
    """PIL image -> RGB PIL image of size x size (bicubic, aspect ratio ignored)."""
    from PIL import Image

    return im.convert("RGB").resize((size, size), Image.BICUBIC)


def normalize(pixels):
    """uint8 pixels (numpy or jax array) -> float32 in [-1, 1], as SigLIP's mean = std = 0.5."""
    return (pixels.astype("float32") / 255.0 - 0.5) / 0.5
