"""SigLIP's text tower and image pooling head (HF SiglipTextModel, SiglipMultiheadAttentionPoolingHead),
and the pair of towers that gives image-text cosines (SiglipModel's normalized embeddings).

Used by the curator's SigLIP score (DataComp's CLIP-score baseline with SigLIP). The text tower has no
attention mask, as SigLIP was trained: captions are padded to max_position_embeddings and the pooled
output is the last position's state (which may be padding) through `head`. Parameter names follow
HF's, so HF `text_model.x.weight` is our ("text_model", "x", kernel|scale|embedding) and HF
`vision_model.head.*` our ("vision_head", ...); see load_hf.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oq2vl_jax.models.config import VisionConfig
from oq2vl_jax.models.layers import LayerNorm, linear
from oq2vl_jax.models.siglip import SiglipEncoder, SiglipMLP, SiglipVisionModel


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
    """HF SiglipTextConfig fields (defaults: siglip-so400m-patch14-384)."""

    vocab_size: int = 32000
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-6
    hidden_act: Literal["gelu", "gelu_pytorch_tanh"] = "gelu_pytorch_tanh"
    projection_size: int = 1152

    def layer_config(self) -> VisionConfig:
        """The encoder layers are SigLIP's vision layers; they read only these fields."""
        return VisionConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                            layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act, feature_layer=-1)


@dataclasses.dataclass(frozen=True)
class SiglipPairConfig:
    vision: VisionConfig  # with feature_layer -1 and feature_post_layernorm: the head's input
    text: SiglipTextConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SiglipPairConfig":
        return cls(vision=VisionConfig(**d["vision"]), text=SiglipTextConfig(**d["text"]))


class SiglipTextEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

    def __call__(self, ids: jax.Array) -> jax.Array:
        pos = self.position_embedding.embedding[...][: ids.shape[1]]
        return self.token_embedding(ids) + pos.astype(self.token_embedding.dtype)[None]


class SiglipTextModel(nnx.Module):
    """ids [B, L] (L <= max_position_embeddings) -> pooled text embeddings [B, projection_size]."""

    def __init__(self, cfg: SiglipTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = SiglipTextEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = SiglipEncoder(cfg.layer_config(), attn_impl="xla", dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.head = linear(cfg.hidden_size, cfg.projection_size, ("vit_embed", None), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.head(self.final_layer_norm(x)[:, -1])


class SiglipPoolingHead(nnx.Module):
    """Multi-head attention pooling of the patch states with one learned probe (torch MultiheadAttention
    layout: in_proj_weight [3D, D] = q; k; v rows, in_proj_bias [3D]), then LayerNorm + MLP residual."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.probe = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (1, 1, d), param_dtype))
        self.attention = _TorchMHA(d, cfg.num_attention_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layernorm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = SiglipMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class _TorchMHA(nnx.Module):
    def __init__(self, d: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.in_proj_weight = nnx.Param(init(rngs.params(), (3 * d, d), param_dtype))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * d,), param_dtype))
        self.out_proj = linear(d, d, (None, None), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.dtype = heads, dtype

    def __call__(self, q_in: jax.Array, kv_in: jax.Array) -> jax.Array:
        w = self.in_proj_weight[...].astype(self.dtype)
        b = self.in_proj_bias[...].astype(self.dtype)
        (wq, wk, wv), (bq, bk, bv) = jnp.split(w, 3), jnp.split(b, 3)
        n, d = q_in.shape[0], q_in.shape[-1]
        split = lambda y: y.reshape(n, -1, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(q_in @ wq.T + bq), split(kv_in @ wk.T + bk), split(kv_in @ wv.T + bv)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) / np.sqrt(d // self.heads)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, -1, d))


class SiglipPair(nnx.Module):
    """SigLIP's two towers: normalized image and text embeddings and their cosine."""

    def __init__(self, cfg: SiglipPairConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.vision.num_layers_run() != cfg.vision.num_hidden_layers or not cfg.vision.feature_post_layernorm:
            raise ValueError("the pooling head reads the last layer after post_layernorm")
        self.cfg = cfg
        self.vision_model = SiglipVisionModel(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_head = SiglipPoolingHead(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_model = SiglipTextModel(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def image_embeds(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, 3] in [-1, 1] -> unit vectors [B, D] (float32)."""
        return _unit(self.vision_head(self.vision_model(pixels)))

    def text_embeds(self, ids: jax.Array) -> jax.Array:
        return _unit(self.text_model(ids))

    def cosine(self, pixels: jax.Array, ids: jax.Array) -> jax.Array:
        """Row-wise image-text cosine [B]."""
        return jnp.sum(self.image_embeds(pixels) * self.text_embeds(ids), axis=-1)


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# HF SiglipModel keys we do not model (the sigmoid loss's scale and bias; buffers).
_IGNORED = ("logit_scale", "logit_bias")


def hf_key(path: tuple) -> str:
    """Our parameter path -> HF SiglipModel key."""
    from oq2vl_jax.treepaths import dotted

    leaf = path[-1]
    hf_leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    head = ("vision_model", "head") if path[0] == "vision_head" else (path[0],)
    return dotted(head + tuple(path[1:-1]) + (hf_leaf,))


def hf_to_pair(sd: Mapping[str, np.ndarray], params: Mapping[tuple, object]) -> dict[tuple, np.ndarray]:
    """HF SiglipModel state dict -> our flat parameters; every tensor used once with the right shape."""
    from oq2vl_jax.models.weights import WeightError, _to_ours

    wanted = {hf_key(p): p for p in params}
    out = {}
    for key in sd:
        if key in _IGNORED or key.endswith("position_ids"):
            continue
        if key not in wanted:
            raise WeightError(f"unexpected SigLIP tensor {key!r} (no parameter of ours)")
        path = wanted[key]
        value = _to_ours(np.asarray(sd[key]), path[-1], np.ndim(sd[key]))
        if tuple(value.shape) != tuple(params[path].shape):
            raise WeightError(f"SigLIP tensor {key!r} has shape {np.shape(sd[key])}; ours needs {params[path].shape}")
        out[path] = value
    missing = [hf_key(p) for p in params if p not in out]
    if missing:
        raise WeightError(f"{len(missing)} SigLIP tensor(s) missing, e.g. {', '.join(missing[:4])}")
    return out
