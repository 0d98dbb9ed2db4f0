"""Image strategies and the original's image quirks, each behind a switch (README "Fidelity").

One entry point, ``to_square(im, size, strategy, alpha, pre_squash)``: PIL image in, RGB PIL image of
size x size out. The defaults are what we consider correct; the other values reproduce the original
(Open-Qwen2VL / prismatic) code paths:

* ``alpha``: "white" composites transparency on white (transformers 5's ``convert_to_rgb``);
  "drop" is PIL's ``convert("RGB")``, which throws alpha away (the original's data path), so a
  transparent area shows whatever colour its pixels happen to store.
* ``pre_squash``: "lanczos" first applies the original pickle packer's resize: when
  ``min(w, h) > size`` the image goes to about size x size with LANCZOS (a typo made the intended
  keep-aspect resize a squash; the float expression can give size - 1). "none" skips it.
* ``strategy`` (prismatic's ``image_resize_strategy``; SigLIP's eval transform resizes the short
  side to ``size``, bicubic, then centre-crops):
  - "squash" ("resize-naive", what Open-Qwen2VL trains with): bicubic to size x size, aspect ignored.
  - "resize-crop": short side to ``size`` (long side ``int(size * long / short)``), centre crop.
  - "letterbox": pad to a square with the normalisation mean (0.5 -> 127) on both sides
    (``int((max - w) / 2)`` each, so an odd difference leaves the image 1 px off square), then
    resize-crop. The second seed paper's SFT uses it.
"""
from __future__ import annotations

STRATEGIES = ("squash", "letterbox", "resize-crop")
ALPHA = ("white", "drop")
PRE_SQUASH = ("none", "lanczos")
LETTERBOX_FILL = (127, 127, 127)  # int(0.5 * 255): SigLIP's normalisation mean


def check(strategy: str, alpha: str, pre_squash: str) -> None:
    for name, value, allowed in (("image_strategy", strategy, STRATEGIES), ("alpha", alpha, ALPHA),
                                 ("pre_squash", pre_squash, PRE_SQUASH)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def to_rgb(im, alpha: str = "white"):
    """RGB PIL image; transparency composited on white ("white") or discarded ("drop"); high bit
    depths scaled to 8 bits (images.to_rgb8), not clipped."""
    from PIL import Image

    from oq2vl_jax.images import HIGH_BIT_DEPTH, to_rgb8

    if im.mode in HIGH_BIT_DEPTH:  # no alpha in these modes
        return to_rgb8(im)
    if alpha == "drop":
        return im.convert("RGB")
    if "A" not in im.getbands() and im.info.get("transparency") is None:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def lanczos_pre_squash(im, size: int = 384):
    """The original pickle packer's resize (its intended keep-aspect formula, typo included)."""
    from PIL import Image

    w, h = im.size
    if min(w, h) <= size:
        return im
    new = (int(size / w * w), size) if w > h else (size, int(size / h * h))
    return im.resize(new, Image.LANCZOS)


def _resize_short(im, size: int):
    from PIL import Image

    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:  # torchvision returns the image untouched then
        return im
    new_long = int(size * long / short)
    return im.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)


def _center_crop(im, size: int):
    w, h = im.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def _letterbox_pad(im):
    from PIL import ImageOps

    w, h = im.size
    side = max(w, h)
    dx, dy = int((side - w) / 2), int((side - h) / 2)
    return ImageOps.expand(im, border=(dx, dy, dx, dy), fill=LETTERBOX_FILL)


def to_square(im, size: int, strategy: str = "squash", alpha: str = "white", pre_squash: str = "none"):
    """PIL image -> RGB PIL image of size x size (see module docstring for the switches)."""
    from PIL import Image

    check(strategy, alpha, pre_squash)
    im = to_rgb(im, alpha)
    if pre_squash == "lanczos":
        im = lanczos_pre_squash(im, size)
    if strategy == "squash":
        return im.resize((size, size), Image.BICUBIC)
    if strategy == "letterbox":
        im = _letterbox_pad(im)
    return _center_crop(_resize_short(im, size), size)
