"""Packed-row records: one ArrayRecord record per row, an ``np.savez`` archive (no pickle).

Fields (L = seq_len, n = samples in the row, m = images in the row):
  input_ids int32[L]          tokens; each image is ``image_tokens`` copies of the image-pad id; pad id after
  segment_ids int32[L]        1..n per sample in row order, 0 on padding
  positions int32[L]          restart at 0 for each sample, 0 on padding
  loss_mask uint8[L]          1 where the token is a training target
  image_bytes uint8[...]      all images of the row, encoded (JPEG/PNG), concatenated in placeholder order
  image_offsets int64[m+1]    image i is image_bytes[offsets[i]:offsets[i+1]]
  image_segment_ids int32[m]  the segment each image belongs to
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

FIELDS = {
    "input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_mask": np.uint8,
    "image_bytes": np.uint8, "image_offsets": np.int64, "image_segment_ids": np.int32,
}


def encode_row(row: dict) -> bytes:
    missing = set(FIELDS) - set(row)
    if missing:
        raise KeyError(f"row record is missing fields {sorted(missing)}")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(row[k], dtype=dt) for k, dt in FIELDS.items()})
    return buf.getvalue()


def decode_row(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        row = {k: z[k] for k in FIELDS}
    for k, dt in FIELDS.items():
        if row[k].dtype != dt:
            raise ValueError(f"row field {k!r} has dtype {row[k].dtype}, expected {np.dtype(dt)}")
    return row


def assemble_row(samples: Sequence[tuple[np.ndarray, np.ndarray, Sequence[bytes]]], seq_len: int,
                 pad_id: int) -> dict:
    """Concatenates (input_ids, loss_mask, encoded images) samples into one right-padded row."""
    ids = np.full(seq_len, pad_id, np.int32)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    mask = np.zeros(seq_len, np.uint8)
    images, image_seg = [], []
    start = 0
    for s, (sample_ids, sample_mask, sample_images) in enumerate(samples, start=1):
        n = len(sample_ids)
        if start + n > seq_len:
            raise ValueError(f"samples need {start + n} tokens, more than seq_len={seq_len}")
        ids[start:start + n] = sample_ids
        mask[start:start + n] = sample_mask
        seg[start:start + n] = s
        pos[start:start + n] = np.arange(n, dtype=np.int32)
        images.extend(sample_images)
        image_seg.extend([s] * len(sample_images))
        start += n
    offsets = np.zeros(len(images) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in images])
    blob = np.frombuffer(b"".join(images), np.uint8) if images else np.zeros(0, np.uint8)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask,
            "image_bytes": blob, "image_offsets": offsets,
            "image_segment_ids": np.asarray(image_seg, np.int32)}
