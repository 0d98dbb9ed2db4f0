"""Qwen2-VL rows for the loader: a packed row record -> text row, M-RoPE positions and patch row.

The record is the packer's (records.py), with images stored already resized (pack.py, qwen2vl
modes). Per row this gives (L = seq_len, P = max_patches, M = max_images):
  input_ids, segment_ids, loss_mask int32[L]; positions int32[3, L] (M-RoPE, per sample)
  patches float32[P, C*14*14] the row's images' patches in placeholder order, zero padding after
  patch_segment_ids int32[P] (1..m per image, 0 = padding), patch_positions int32[P, 2]
  image_mask bool[M] (how many images the row holds), corrupt int32
An image that does not decode keeps its place (zero patches of its token count, so later images stay
aligned with their placeholders) and its sample's loss is masked, as RowDecoder does.
"""

from __future__ import annotations

import io

import numpy as np

from oq2vl_jax.data.qwen2_vl_images import MEAN, STD, pack_patch_row, patchify
from oq2vl_jax.data.records import decode_row
from oq2vl_jax.models.config import Qwen2VLVisionConfig
from oq2vl_jax.models.mrope import rope_index


def _image_runs(ids: np.ndarray, image_id: int) -> list[int]:
    """Lengths of the runs of image placeholders, in order."""
    is_img = np.concatenate([[False], ids == image_id, [False]])
    edges = np.flatnonzero(is_img[1:] != is_img[:-1])
    return list(edges[1::2] - edges[::2])


class Qwen2VLRowDecoder:
    def __init__(self, seq_len: int, max_images: int, max_patches: int, vision: Qwen2VLVisionConfig,
                 image_token_id: int, one_sample: bool = False):
        if max_patches % vision.spatial_merge_size**2:
            raise ValueError(f"max_patches={max_patches} must be a multiple of {vision.spatial_merge_size**2}")
        self.seq_len, self.max_images, self.max_patches = seq_len, max_images, max_patches
        self.vision, self.image_token_id, self.one_sample = vision, image_token_id, one_sample

    def _image(self, data: bytes, n_tokens: int):
        """(patches, grid) of a stored image, or None if it does not decode or does not match."""
        from PIL import Image

        v = self.vision
        try:
            with Image.open(io.BytesIO(data)) as im:
                px = np.asarray(im.convert("RGB"), np.float32)
        except Exception:  # noqa: BLE001 (PIL raises many types)
            return None
        h, w = px.shape[:2]
        if h % v.factor or w % v.factor or (h // v.factor) * (w // v.factor) != n_tokens:
            raise ValueError(f"stored image of {h}x{w} does not give its {n_tokens} placeholders; was the data "
                             "packed with a qwen2vl mode and these min/max pixels?")
        return patchify((px * np.float32(1 / 255) - MEAN) / STD, v), (h // v.patch_size, w // v.patch_size)

    def __call__(self, data: bytes) -> dict:
        try:
            row = decode_row(data)
        except Exception:  # noqa: BLE001 (a damaged record)
            return self.empty(corrupt=1)
        ids, seg = row["input_ids"], row["segment_ids"]
        if len(ids) != self.seq_len:
            raise ValueError(f"row has length {len(ids)}, loader seq_len={self.seq_len}")
        n_img = len(row["image_segment_ids"])
        if n_img > self.max_images:
            raise ValueError(f"row has {n_img} images but the loader has max_images={self.max_images}")
        if self.one_sample and seg.max(initial=0) > 1:
            raise ValueError("mode='unpacked_sft' got a row holding several samples; pack with --packing none")
        runs = _image_runs(ids, self.image_token_id)
        if len(runs) != n_img:
            raise ValueError(f"row has {len(runs)} image placeholder runs for {n_img} images")
        loss_mask = row["loss_mask"].astype(np.int32)
        blob, offsets = row["image_bytes"].tobytes(), row["image_offsets"]
        merge, corrupt, images = self.vision.spatial_merge_size, 0, []
        for i, n in enumerate(runs):
            got = self._image(blob[offsets[i]:offsets[i + 1]], n)
            if got is None:
                corrupt += 1
                loss_mask[seg == row["image_segment_ids"][i]] = 0
                got = (np.zeros((n * merge**2, self.vision.patch_dim), np.float32), (merge, merge * n))
            images.append(got)
        positions = np.zeros((3, self.seq_len), np.int32)
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            grids = [g for (_, g), gs in zip(images, row["image_segment_ids"]) if gs == s]
            positions[:, where] = rope_index(ids[where], grids, self.image_token_id, merge)[0]
        patches, pseg, ppos = pack_patch_row(images, self.max_patches, merge)
        if not images:
            patches = np.zeros((self.max_patches, self.vision.patch_dim), np.float32)
        return {"input_ids": ids, "segment_ids": seg, "positions": positions, "loss_mask": loss_mask,
                "patches": patches, "patch_segment_ids": pseg, "patch_positions": ppos,
                "image_mask": np.arange(self.max_images) < n_img, "corrupt": np.int32(corrupt)}

    def empty(self, pad_id: int = 0, corrupt: int = 0) -> dict:
        z = np.zeros(self.seq_len, np.int32)
        return {"input_ids": z + pad_id, "segment_ids": z, "positions": np.zeros((3, self.seq_len), np.int32),
                "loss_mask": z, "patches": np.zeros((self.max_patches, self.vision.patch_dim), np.float32),
                "patch_segment_ids": np.zeros(self.max_patches, np.int32),
                "patch_positions": np.zeros((self.max_patches, 2), np.int32),
                "image_mask": np.zeros(self.max_images, bool), "corrupt": np.int32(corrupt)}
