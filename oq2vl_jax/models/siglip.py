"""SigLIP vision tower (HF SiglipVisionModel layout, without the attention-pooling head).

Images come in NHWC, normalised to [-1, 1]. The patch grid is image_size // patch_size per side
(a VALID convolution: for 384/14 the last 6 pixel rows/columns are never seen). The tower returns
the hidden states selected by `feature_layer` (HF `hidden_states[feature_layer]`, i.e. before
`post_layernorm`), running only the layers needed for it. All layers and `post_layernorm` exist as
parameters anyway so that checkpoints round-trip to HF unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oq2vl_jax.models.attention import attention
from oq2vl_jax.models.config import VisionConfig
from oq2vl_jax.models.layers import LayerNorm, gelu, linear
from oq2vl_jax.sharding import constrain


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
            dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, None, "vit_embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("vit_embed",)),
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("patches", "vit_embed")),
            rngs=rngs,
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.patch_embedding(pixels)  # [N, g, g, D], row-major patches as torch's flatten(2)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, attn_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, d, ("vit_embed", "vit_heads"), **kw)
        self.k_proj = linear(d, d, ("vit_embed", "vit_heads"), **kw)
        self.v_proj = linear(d, d, ("vit_embed", "vit_heads"), **kw)
        self.out_proj = linear(d, d, ("vit_heads", "vit_embed"), **kw)
        self.num_heads = cfg.num_attention_heads
        self.attn_impl = attn_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        split = lambda y: y.reshape(n, t, self.num_heads, d // self.num_heads)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = attention(q, k, v, causal=False, impl=self.attn_impl)
        return self.out_proj(out.reshape(n, t, d))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("vit_embed", "vit_mlp"), **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("vit_mlp", "vit_embed"), **kw)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x), self.act))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, attn_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(param_dtype=param_dtype, names=("norm",))
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm)
        self.self_attn = SiglipAttention(cfg, attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm)
        self.mlp = SiglipMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, ("batch", "seq", None))


class SiglipEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, **kw):
        self.layers = nnx.List([SiglipEncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])


class SiglipVisionModel(nnx.Module):
    """Vision tower; `__call__` returns the selected features [N, num_patches, hidden_size]."""

    def __init__(self, cfg: VisionConfig, *, attn_impl: str = "xla", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.embeddings = SiglipVisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = SiglipEncoder(cfg, attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.embeddings(pixels.astype(self.dtype))
        for layer in self.encoder.layers[: self.cfg.num_layers_run()]:
            x = layer(x)
        if self.cfg.feature_post_layernorm:
            x = self.post_layernorm(x)
        return x
