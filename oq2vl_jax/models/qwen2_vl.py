"""Qwen2-VL: native-resolution vision tower -> 2x2 patch merger -> image tokens spliced into a Qwen2
decoder with M-RoPE (HF Qwen2VLForConditionalGeneration).

Batch layout (one packed text row and one patch row per batch row; see oq2vl_jax/data):
  input_ids         int32 [B, T]  each image's positions hold `image_token_id`, one per merged token
  segment_ids       int32 [B, T]  1..n per sample in the row, 0 = padding
  positions         int32 [B, 3, T]  M-RoPE (temporal, height, width) positions, restarting at 0 for
                    each sample (models/mrope.py); 0 on padding
  loss_mask         int   [B, T]  1 where the token is a training target
  patches           float [B, P, C*p*p]  the row's images' patches, image after image in placeholder
                    order, then zero padding (data/qwen2_vl_images.py); P a multiple of 4
  patch_segment_ids int32 [B, P]  1..m per image, 0 = padding
  patch_positions   int32 [B, P, 2]  each patch's (h, w) on its image's patch grid
The k-th image placeholder of a row takes the row's k-th merged token (4 patches each).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from oq2vl_jax.models.config import ModelConfig
from oq2vl_jax.models.layers import dtype_of
from oq2vl_jax.models.qwen2 import Qwen2ForCausalLM
from oq2vl_jax.models.qwen2_vl_vision import Qwen2VisionTransformer
from oq2vl_jax.models.vlm import row_token_losses, splice_image_embeddings

PATCH_KEYS = ("patches", "patch_segment_ids", "patch_positions")


class Qwen2VL(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype = dtype_of(cfg.param_dtype)
        self.visual = Qwen2VisionTransformer(cfg.qwen2_vl_vision, attn_impl=cfg.attention,
                                             dtype=dtype_of(cfg.vision_dtype), param_dtype=param_dtype, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(
            cfg.text, attn_impl=cfg.attention, cross_segment=False, max_segments=cfg.max_segments,
            remat=cfg.remat, dtype=dtype_of(cfg.dtype), param_dtype=param_dtype, rngs=rngs,
        )

    def image_features(self, patches, patch_segment_ids, patch_positions):
        """Merged image tokens [B, P/4, text hidden] of each patch row."""
        return self.visual(patches, patch_segment_ids, patch_positions)

    def embed(self, input_ids, patches=None, patch_segment_ids=None, patch_positions=None):
        text = self.language_model.embed(input_ids)
        if patches is None or patches.shape[1] == 0:  # text-only batch
            return text
        img = self.image_features(patches, patch_segment_ids, patch_positions)
        return splice_image_embeddings(input_ids, text, img.astype(text.dtype), self.cfg.image_token_id)

    def __call__(self, input_ids, positions=None, segment_ids=None, patches=None, patch_segment_ids=None,
                 patch_positions=None):
        """Logits [B, T, vocab]; positions [B, 3, T] (None: text-only 0..T-1)."""
        lm = self.language_model
        embeds = self.embed(input_ids, patches, patch_segment_ids, patch_positions)
        return lm.logits(lm.hidden_states(embeds, _mrope(positions), segment_ids))

    def loss(self, batch: dict):
        """(sum of token losses, target count) for one batch; see vlm.token_losses."""
        sums, counts = self.row_losses(batch)
        return jnp.sum(sums), jnp.sum(counts)

    def row_losses(self, batch: dict):
        """(sums of token losses [B], target counts [B]) per row of the batch."""
        lm, cfg = self.language_model, self.cfg
        ids, seg = batch["input_ids"], batch["segment_ids"]
        embeds = self.embed(ids, *(batch.get(k) for k in PATCH_KEYS))
        hidden = lm.hidden_states(embeds, _mrope(batch["positions"]), seg)
        return row_token_losses(lm, hidden, batch, chunk=cfg.loss_chunk_size, cross_segment=False)


def _mrope(positions):
    """Batch positions [B, 3, T] (batch-major so the loader's rows shard on axis 0) -> [3, B, T]."""
    return None if positions is None else jnp.moveaxis(positions, 1, 0)
