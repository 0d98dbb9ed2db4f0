"""Host-side position ids for Qwen2-VL: M-RoPE positions of a text sample and 2-D patch positions.

M-RoPE (HF Qwen2VLModel.get_rope_index): a text token's three positions (temporal, height, width)
are all its running index; an image's merged tokens, a gh x gw grid laid out row-major, get
(s, s + row, s + column) where s is the next index, and the text after the image continues at
s + max(gh, gw). A sample's positions therefore end below its length; `delta` (last position + 1 -
length) is what decoding adds to the plain index of each new token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def rope_index(input_ids: np.ndarray, grids: Sequence[tuple[int, int]], image_token_id: int,
               merge: int = 2) -> tuple[np.ndarray, int]:
    """(positions int32 [3, T], delta) for one sample. grids: each image's (h, w) patch grid, in the
    order of its placeholders; image i owns the next (h/merge)(w/merge) placeholder tokens."""
    ids = np.asarray(input_ids)
    out = np.zeros((3, len(ids)), np.int32)
    t, nxt, images = 0, 0, iter(grids)
    while t < len(ids):
        if ids[t] != image_token_id:
            out[:, t] = nxt
            t, nxt = t + 1, nxt + 1
            continue
        try:
            gh, gw = next(images)
        except StopIteration:
            raise ValueError(f"more image placeholders than the {len(grids)} image grid(s) given") from None
        h, w = gh // merge, gw // merge
        n = h * w
        if not np.all(ids[t:t + n] == image_token_id):
            raise ValueError(f"an image of {h}x{w} merged tokens needs {n} consecutive placeholders at {t}")
        rows, cols = np.divmod(np.arange(n), w)
        out[0, t:t + n] = nxt
        out[1, t:t + n] = nxt + rows
        out[2, t:t + n] = nxt + cols
        t, nxt = t + n, nxt + max(h, w)
    if next(images, None) is not None:
        raise ValueError(f"{len(grids)} image grid(s) given but fewer image placeholder runs found")
    last = int(out.max()) if len(ids) else -1
    return out, last + 1 - len(ids)


def patch_positions(grid_h: int, grid_w: int, merge: int = 2) -> np.ndarray:
    """int32 [grid_h * grid_w, 2]: each patch's (h, w) in HF's block-major patch order (the merge x
    merge patches of a block are consecutive, blocks row-major)."""
    hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    h = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    w = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([h, w], axis=-1).astype(np.int32)
