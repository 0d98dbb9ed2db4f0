"""Qwen2-VL image preprocessing (HF Qwen2VLImageProcessor, PIL backend): dynamic resolution.

Each image keeps its aspect ratio: it is resized (bicubic) so that both sides are multiples of
patch_size * spatial_merge_size (28) and its area lies within [min_pixels, max_pixels], then cut
into 14x14 patches in block-major order (each 2x2 merge block's patches consecutive). An h x w
image gives (h/14)(w/14) patches and a quarter as many LLM tokens.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from oq2vl_jax.models.config import Qwen2VLVisionConfig
from oq2vl_jax.models.mrope import patch_positions

# OpenAI CLIP normalisation, as Qwen2-VL's processor uses.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
MAX_ASPECT = 200


class ImageShapeError(ValueError):
    """An image Qwen2-VL's processor refuses (aspect ratio over 200)."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The (height, width) HF resizes an image to: multiples of `factor`, close to the original
    aspect ratio, area within [min_pixels, max_pixels] (rounded to the factor grid)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageShapeError(f"image of {height}x{width}: aspect ratio over {MAX_ASPECT}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def grid_for(height: int, width: int, cfg: Qwen2VLVisionConfig) -> tuple[int, int]:
    """The (h, w) patch grid of an image of height x width pixels after resizing."""
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return h // cfg.patch_size, w // cfg.patch_size


def num_image_tokens(height: int, width: int, cfg: Qwen2VLVisionConfig) -> int:
    gh, gw = grid_for(height, width, cfg)
    return gh * gw // cfg.spatial_merge_size**2


def resize(image: Image.Image, cfg: Qwen2VLVisionConfig) -> Image.Image:
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return image.resize((w, h), Image.Resampling.BICUBIC)


def patchify(pixels: np.ndarray, cfg: Qwen2VLVisionConfig) -> np.ndarray:
    """Normalised float32 [H, W, C] (sides multiples of the factor) -> [N, C*p*p] patches, block-major,
    each channel-major (c, y, x) as HF flattens them (without HF's repeated temporal frame)."""
    p, m = cfg.patch_size, cfg.spatial_merge_size
    height, width, c = pixels.shape
    gh, gw = height // p, width // p
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (block h, block w, in-block h, in-block w, c, y, x)
    return np.ascontiguousarray(x.reshape(gh * gw, c * p * p))


def image_patches(image: Image.Image, cfg: Qwen2VLVisionConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """An image -> (patches float32 [N, C*p*p], its (h, w) patch grid)."""
    resized = resize(image, cfg)
    pixels = (np.asarray(resized, np.float32) * np.float32(1 / 255) - MEAN) / STD
    patches = patchify(pixels, cfg)
    return patches, (resized.height // cfg.patch_size, resized.width // cfg.patch_size)


def pack_patch_row(images: list[tuple[np.ndarray, tuple[int, int]]], length: int, merge: int = 2):
    """Several images' patches one after another in a row of `length` patches (zero padding after):
    (patches [length, D], segment ids [length] 1..n per image, positions [length, 2])."""
    dim = images[0][0].shape[1] if images else 0
    patches = np.zeros((length, dim), np.float32)
    seg = np.zeros((length,), np.int32)
    pos = np.zeros((length, 2), np.int32)
    start = 0
    for i, (p, (gh, gw)) in enumerate(images):
        end = start + len(p)
        if end > length:
            raise ValueError(f"images of {end} patches do not fit a patch row of {length}")
        patches[start:end], seg[start:end], pos[start:end] = p, i + 1, patch_positions(gh, gw, merge)
        start = end
    return patches, seg, pos


def prepare_image(data: bytes, cfg: Qwen2VLVisionConfig, fmt: str = "jpeg", quality: int = 95):
    """Encoded image -> (the resized image re-encoded, its (h, w) patch grid), for packing: the
    loader then only decodes and patchifies. Raises SampleError for an unreadable or too thin image."""
    import io

    from oq2vl_jax.data.samples import SampleError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = resize(im, cfg)
    except ImageShapeError as e:
        raise SampleError("bad_image_shape", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    out = io.BytesIO()
    if fmt == "jpeg":
        im.save(out, format="JPEG", quality=quality, subsampling=0)
    else:
        im.save(out, format="PNG", compress_level=1)
    return out.getvalue(), (im.height // cfg.patch_size, im.width // cfg.patch_size)
