"""Qwen2 decoder (Qwen2.5 family), HF Qwen2ForCausalLM layout.

GQA with q/k/v biases, half-split ("rotate_half") RoPE at explicit per-token positions, RMSNorm in
float32, SiLU-gated MLP, tied or untied LM head. Attention is restricted to the token's own segment
of a packed row unless `cross_segment` (the original's plain causal over the row).

Inference adds a KV-cache path (`hidden_states_cached`, models/cache.py) beside the training
forward: the same projections and RoPE, attention through the XLA reference with a cache mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oq2vl_jax.models import cache as kv_cache
from oq2vl_jax.models.attention import attention, xla_attention
from oq2vl_jax.models.config import TextConfig
from oq2vl_jax.models.layers import RMSNorm, linear
from oq2vl_jax.sharding import constrain


def rope(x: jax.Array, positions: jax.Array, theta: float, mrope_section=None) -> jax.Array:
    """x: [B, T, N, H]; positions: int [B, T], or [3, B, T] with `mrope_section` (M-RoPE: frequency
    pair j turns by the temporal, height or width position, the first mrope_section[0] pairs by the
    temporal one, and so on, as HF Qwen2-VL). cos/sin in float32, cast to x's dtype as HF does."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if mrope_section is not None:
        if positions.ndim == 2:  # text tokens (e.g. decoding): the same position on all three rows
            positions = jnp.broadcast_to(positions, (3,) + positions.shape)
        rows = np.repeat(np.arange(3), mrope_section)  # [H/2]: which position row drives pair j
        positions = jnp.moveaxis(positions[rows], 0, -1)  # [B, T, H/2]
        freqs = positions.astype(jnp.float32) * inv_freq
    else:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, attn: dict, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, cfg.num_attention_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = linear(d, cfg.num_key_value_heads * hd, ("embed", "kv"), **kw)
        self.v_proj = linear(d, cfg.num_key_value_heads * hd, ("embed", "kv"), **kw)
        self.o_proj = linear(cfg.num_attention_heads * hd, d, ("heads", "embed"), use_bias=False, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.rope_theta = cfg.rope_theta
        self.mrope_section = cfg.mrope_section
        self.attn = attn  # impl / cross_segment / max_segments

    def _qkv(self, x, positions):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = rope(q, positions, self.rope_theta, self.mrope_section)
        return q, rope(k, positions, self.rope_theta, self.mrope_section), v

    def __call__(self, x, positions, segment_ids):
        q, k, v = self._qkv(x, positions)
        out = attention(q, k, v, segment_ids, causal=True, **self.attn)
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1))

    def cached(self, x, positions, k_buf, v_buf, index, mask):
        """Attention of x [B, T, D] over the cache after writing its keys/values at slots
        index..index+T-1. mask: bool [B, T, S]. Returns (out, k_buf, v_buf).

        Always the XLA reference attention: decode steps are memory-bound and the cache mask is a
        plain boolean one, which the packed cuDNN path does not take."""
        q, k, v = self._qkv(x, positions)
        k_buf, v_buf = kv_cache.write(k_buf, k, index), kv_cache.write(v_buf, v, index)
        out = xla_attention(q, k_buf, v_buf, mask, self.head_dim**-0.5)
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1)), k_buf, v_buf


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, attn: dict, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Qwen2Attention(cfg, attn=attn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = Qwen2MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", None))

    def cached(self, x, positions, k_buf, v_buf, index, mask):
        h, k_buf, v_buf = self.self_attn.cached(self.input_layernorm(x), positions, k_buf, v_buf, index, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_buf, v_buf


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_call(layer, x, positions, segment_ids):
    return layer(x, positions, segment_ids)


class Qwen2Model(nnx.Module):
    def __init__(self, cfg: TextConfig, *, attn: dict, remat: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        self.layers = nnx.List([
            Qwen2DecoderLayer(cfg, attn=attn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(cfg.num_hidden_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.remat = remat

    def __call__(self, inputs_embeds, positions, segment_ids):
        call = _layer_call
        if self.remat != "none":
            call = nnx.remat(_layer_call, policy=REMAT_POLICIES[self.remat])
        x = constrain(inputs_embeds, ("batch", "seq", None))
        for layer in self.layers:
            x = call(layer, x, positions, segment_ids)
        return self.norm(x)


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, cfg: TextConfig, *, attn_impl: str = "xla", cross_segment: bool = False,
                 max_segments: int = 64, remat: str = "none", dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.cross_segment = cross_segment
        attn = dict(impl=attn_impl, cross_segment=cross_segment, max_segments=max_segments)
        self.model = Qwen2Model(cfg, attn=attn, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(input_ids)

    def hidden_states(self, inputs_embeds, positions=None, segment_ids=None):
        """Final normed hidden states. Positions ([B, T], or [3, B, T] with M-RoPE) default to 0..T-1,
        segments to one per row."""
        b, t = inputs_embeds.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None or self.cross_segment:
            # The original never reset positions inside a packed row.
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if self.cfg.mrope_section is not None:  # M-RoPE: text-only positions, the same on all 3 rows
                positions = jnp.broadcast_to(positions, (3, b, t))
        return self.model(inputs_embeds, positions, segment_ids)

    def hidden_states_cached(self, inputs_embeds, positions, valid, cache: kv_cache.KVCache):
        """Incremental forward: T new tokens per row (prefill or one decode step) against the cache.

        positions int [B, T] ([3, B, T] with M-RoPE) are the tokens' RoPE positions; valid bool [B, T] is False for padding,
        which no later token attends to. Returns (final normed hidden states [B, T, D], new cache)."""
        slot_mask, mask = cache.attention_mask(valid)
        x, ks, vs = inputs_embeds, [], []
        for layer, k_buf, v_buf in zip(self.model.layers, cache.k, cache.v):
            x, k_buf, v_buf = layer.cached(x, positions, k_buf, v_buf, cache.index, mask)
            ks.append(k_buf)
            vs.append(v_buf)
        new = kv_cache.KVCache(k=tuple(ks), v=tuple(vs), mask=slot_mask,
                               index=cache.index + inputs_embeds.shape[1])
        return self.model.norm(x), new

    def output_matrix(self) -> jax.Array:
        """The LM head as a [hidden, vocab] matrix in the compute dtype (the embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...].astype(self.dtype).T
        return self.lm_head.kernel[...].astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits (accumulated in f32 from compute-dtype inputs, as the chunked loss does)."""
        return jnp.dot(hidden.astype(self.dtype), self.output_matrix(), preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.logits(self.hidden_states(self.embed(input_ids), positions, segment_ids))
