"""Packed-row records: one ArrayRecord record per row.

A record is ``b"OQR1"``, a little-endian uint32 header length, a JSON header giving each field's
element count, then the fields' raw little-endian bytes in FIELDS order. (Not ``np.savez``: its header
is parsed with ``ast.literal_eval``, which raises SystemError when Grain's reader threads run it
concurrently on CPython 3.11.)

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

import json
import struct
from collections.abc import Sequence

import numpy as np

MAGIC = b"OQR1"
FIELDS = {
    "input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_mask": np.uint8,
    "image_bytes": np.uint8, "image_offsets": np.int64, "image_segment_ids": np.int32,
}


def encode_row(row: dict) -> bytes:
    missing = set(FIELDS) - set(row)
    if missing:
        raise KeyError(f"row record is missing fields {sorted(missing)}")
    arrays = {k: np.ascontiguousarray(row[k], dtype=np.dtype(dt).newbyteorder("<")).ravel()
              for k, dt in FIELDS.items()}
    header = json.dumps({k: int(a.size) for k, a in arrays.items()}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header] + [a.tobytes() for a in arrays.values()])


def decode_row(data: bytes) -> dict:
    if data[:4] != MAGIC:
        raise ValueError("not a packed-row record (bad magic); was it written by oq2vl_jax.data.pack?")
    (n,) = struct.unpack_from("<I", data, 4)
    sizes = json.loads(data[8:8 + n])
    if set(sizes) != set(FIELDS):
        raise ValueError(f"row record fields {sorted(sizes)} != {sorted(FIELDS)}")
    row, offset = {}, 8 + n
    for k, dt in FIELDS.items():
        dt = np.dtype(dt).newbyteorder("<")
        row[k] = np.frombuffer(data, dtype=dt, count=sizes[k], offset=offset).astype(FIELDS[k], copy=False)
        offset += sizes[k] * dt.itemsize
    if offset != len(data):
        raise ValueError(f"row record has {len(data) - offset} trailing bytes")
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


def fill_slack_as_target(row: dict, token_id: int) -> dict:
    """The original pickle path's pad quirk: the row's padding becomes ``token_id`` tokens that are
    trained on (loss_mask 1), as one more segment (positions from 0) after the row's samples."""
    seg = row["segment_ids"]
    start = int(np.count_nonzero(seg))
    if start == len(seg):
        return row
    row = dict(row)
    for k in ("input_ids", "segment_ids", "positions", "loss_mask"):
        row[k] = row[k].copy()
    row["input_ids"][start:] = token_id
    row["loss_mask"][start:] = 1
    row["segment_ids"][start:] = seg.max(initial=0) + 1
    row["positions"][start:] = np.arange(len(seg) - start, dtype=np.int32)
    return row
