"""The VLM: SigLIP tower -> pooled MLP projector -> image embeddings spliced into Qwen2.

Batch layout (one packed row per batch row; see oq2vl_jax/data):
  input_ids   int32 [B, T]  image positions hold `image_token_id`, `image_tokens` per image
  segment_ids int32 [B, T]  1..n per sample in the row, 0 = padding
  positions   int32 [B, T]  restart at 0 for each sample
  loss_mask   int   [B, T]  1 where the token is a training target
  images      float [B, M, H, W, 3] in [-1, 1] (or uint8 pixels); the row's images in placeholder
              order, zero-filled
The i-th image placeholder of a row takes the i-th image token of that row's images, in order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oq2vl_jax.images import normalize
from oq2vl_jax.models.config import ModelConfig
from oq2vl_jax.models.layers import dtype_of
from oq2vl_jax.models.projector import MultiModalProjector
from oq2vl_jax.models.qwen2 import Qwen2ForCausalLM
from oq2vl_jax.models.siglip import SiglipVisionModel
from oq2vl_jax.sharding import batch_shards, replicate


def splice_image_embeddings(input_ids, text_embeds, image_embeds, image_token_id):
    """Replaces each row's placeholder positions, in order, by that row's image embeddings.

    text_embeds [B, T, D]; image_embeds [B, M*K, D] (row b's images flattened in order).
    """
    is_img = input_ids == image_token_id
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, idx[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def _targets(input_ids, loss_mask, segment_ids, cross_segment: bool):
    """Targets [B, T-1] and their float32 weights: position t predicts token t+1 where token t+1 is a
    target. With segment isolation a sample's first token is never predicted from the previous sample
    (they can't see each other)."""
    weights = loss_mask[:, 1:].astype(bool)
    if not cross_segment:
        weights &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return input_ids[:, 1:], weights.astype(jnp.float32)


def _nll(logits, targets):
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def token_losses(logits, input_ids, loss_mask, segment_ids, cross_segment: bool):
    """Next-token cross entropy in float32, per row: (sums of losses [B], target-token counts [B])."""
    targets, w = _targets(input_ids, loss_mask, segment_ids, cross_segment)
    return jnp.sum(_nll(logits[:, :-1], targets) * w, axis=1), jnp.sum(w, axis=1)


@jax.custom_vjp
def _f32_logits(h, w):
    """h [..., D] @ w [D, V], accumulated and returned in float32. The backward pass takes the logits'
    gradient in w's dtype, so its two vocabulary-wide gemms run in bf16 (as in the unchunked path,
    whose logits are bf16), not in float32 at half the tensor-core rate (bench/gpu_aot.py: ~4% of a
    pre-training step). With float32 weights it is plain autodiff."""
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def _f32_logits_fwd(h, w):
    return _f32_logits(h, w), (h, w)


def _f32_logits_bwd(res, g):
    h, w = res
    g = g.astype(w.dtype)
    dh = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
    dw = jnp.einsum("...d,...v->dv", h, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh, dw


_f32_logits.defvjp(_f32_logits_fwd, _f32_logits_bwd)


def chunked_token_losses(hidden, out_matrix, input_ids, loss_mask, segment_ids, cross_segment: bool,
                         chunk: int):
    """token_losses computed `chunk` positions at a time from the final hidden states, so the
    [B, T, vocab] float32 logits are never held at once (each chunk's are recomputed for the backward)."""
    targets, w = _targets(input_ids, loss_mask, segment_ids, cross_segment)
    b, t = targets.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets, w_pad = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(w, ((0, 0), (0, pad)))
    split = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def chunk_loss(h_c, t_c, w_c):
        logits = _f32_logits(h_c.astype(out_matrix.dtype), out_matrix)
        return jnp.sum(_nll(logits, t_c) * w_c, axis=1)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32), (split(h), split(targets), split(w_pad)))
    return total, jnp.sum(w, axis=1)


def row_token_losses(lm, hidden, batch: dict, *, chunk: int, cross_segment: bool):
    """(sums of token losses [B], target counts [B]) from the final hidden states: `chunk` positions at a
    time (chunked_token_losses) when chunk is set, else from the whole rows' logits (token_losses)."""
    ids, seg, mask = batch["input_ids"], batch["segment_ids"], batch["loss_mask"]
    if chunk:
        return chunked_token_losses(hidden, lm.output_matrix(), ids, mask, seg, cross_segment, chunk)
    return token_losses(lm.logits(hidden), ids, mask, seg, cross_segment)


class OQ2VL(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.require_resolved()
        self.cfg = cfg
        param_dtype = dtype_of(cfg.param_dtype)
        self.vision_tower = SiglipVisionModel(
            cfg.vision, attn_impl=cfg.attention, dtype=dtype_of(cfg.vision_dtype), param_dtype=param_dtype,
            rngs=rngs,
        )
        self.multi_modal_projector = MultiModalProjector(
            cfg.vision.hidden_size, cfg.text.hidden_size, cfg.pooled_side, cfg.projector_hidden_act,
            dtype=dtype_of(cfg.dtype), param_dtype=param_dtype, rngs=rngs,
        )
        self.language_model = Qwen2ForCausalLM(
            cfg.text, attn_impl=cfg.attention, cross_segment=cfg.cross_segment_attention,
            max_segments=cfg.segments, remat=cfg.remat, dtype=dtype_of(cfg.dtype),
            param_dtype=param_dtype, rngs=rngs,
        )

    def image_features(self, images: jax.Array) -> jax.Array:
        """images [N, H, W, 3] -> projected image tokens [N, image_tokens, text hidden]."""
        feats = self.vision_tower(images)
        return self.multi_modal_projector(feats.astype(dtype_of(self.cfg.dtype)))

    def tower_features_chunked(self, images: jax.Array, counts: jax.Array) -> jax.Array:
        """Tower features [B*M, patches, D] of images [B, M, H, W, 3] whose row b holds counts[b]
        real images in its first slots; empty slots get zeros without running the tower.

        Within each batch shard (rows are split over devices) the real images are moved to the
        front, then the tower runs on `vision_chunk_size` slots per shard at a time; a chunk past
        every shard's real images is skipped (a lax.cond, so it stays differentiable)."""
        b, m = images.shape[:2]
        shards = batch_shards()
        shards = shards if b % shards == 0 else 1
        per = b // shards * m
        chunk = min(self.cfg.vision_chunk_size, per)
        n_chunks = -(-per // chunk)
        real = (jnp.arange(m)[None] < counts[:, None]).reshape(shards, per)
        order = jnp.argsort(~real, axis=1, stable=True)  # real images first, in slot order
        imgs = images.reshape((shards, per) + images.shape[2:])
        imgs = jnp.take_along_axis(imgs, order.reshape(order.shape + (1, 1, 1)), axis=1)
        imgs = jnp.pad(imgs, ((0, 0), (0, n_chunks * chunk - per)) + ((0, 0),) * 3)
        most = jnp.max(jnp.sum(real, axis=1))
        # Gather the (FSDP-sharded) tower once here, not once per chunk inside the conditionals, and
        # in its compute dtype: matrices are cast where they are used anyway (norms stay float32), so
        # casting first halves the gather and saves a cast per chunk (bench/gpu_aot.py: ~2% of a step).
        graphdef, state = nnx.split(self.vision_tower)
        dtype = self.vision_tower.dtype
        state = replicate(jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, state))

        def run(st, x):
            return nnx.merge(graphdef, st)(x)

        def skip(st, x):
            return jnp.zeros(out.shape, out.dtype)

        x0 = imgs[:, :chunk].reshape((shards * chunk,) + imgs.shape[2:])
        out = jax.eval_shape(run, state, x0)
        feats = []
        for j in range(n_chunks):
            x = imgs[:, j * chunk:(j + 1) * chunk].reshape((shards * chunk,) + imgs.shape[2:])
            feats.append(jax.lax.cond(j * chunk < most, run, skip, state, x).reshape((shards, chunk) + out.shape[1:]))
        feats = jnp.concatenate(feats, axis=1)[:, :per]
        feats = jnp.take_along_axis(feats, jnp.argsort(order, axis=1).reshape(order.shape + (1, 1)), axis=1)
        return feats.reshape((b * m,) + out.shape[1:])

    def embed(self, input_ids, images):
        text = self.language_model.embed(input_ids)
        if images is None or images.shape[1] == 0:  # text-only batch
            return text
        if images.dtype == jnp.uint8:  # raw pixels from the loader: normalise on the device
            images = normalize(images)
        b, m = images.shape[:2]
        if self.cfg.vision_chunk_size:
            # A row's images fill its first slots, one per `image_tokens` placeholders.
            counts = jnp.sum(input_ids == self.cfg.image_token_id, axis=1) // self.cfg.image_tokens
            feats = self.tower_features_chunked(images, counts)
            img = self.multi_modal_projector(feats.astype(dtype_of(self.cfg.dtype)))
        else:
            img = self.image_features(images.reshape((b * m,) + images.shape[2:]))
        return splice_image_embeddings(input_ids, text, img.reshape(b, -1, img.shape[-1]),
                                       self.cfg.image_token_id)

    def __call__(self, input_ids, images=None, positions=None, segment_ids=None):
        """Logits [B, T, vocab]."""
        lm = self.language_model
        return lm.logits(lm.hidden_states(self.embed(input_ids, images), positions, segment_ids))

    def loss(self, batch: dict):
        """(sum of token losses, target count) for one batch; see token_losses."""
        sums, counts = self.row_losses(batch)
        return jnp.sum(sums), jnp.sum(counts)

    def row_losses(self, batch: dict):
        """(sums of token losses [B], target counts [B]) per row of the batch."""
        lm, cfg = self.language_model, self.cfg
        ids, seg = batch["input_ids"], batch["segment_ids"]
        hidden = lm.hidden_states(self.embed(ids, batch.get("images")), batch["positions"], seg)
        chunk = cfg.loss_chunk_size if ids.shape[1] - 1 > cfg.loss_chunk_size else 0  # shorter rows: one chunk
        return row_token_losses(lm, hidden, batch, chunk=chunk, cross_segment=cfg.cross_segment_attention)
