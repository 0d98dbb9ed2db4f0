"""Qwen2-VL vision tower (HF Qwen2VisionTransformerPretrainedModel layout, names as HF's `visual.*`).

Images arrive as rows of patches, each patch one frame of C x p x p values (channel-major, as HF's
processor flattens them), in HF's block-major order: the 4 patches of each 2x2 merge block are
consecutive. A row may hold several images one after another (and padding at the end); patch
segment ids (1..n per image, 0 = padding) keep attention inside each image, and each patch carries
its own (h, w) grid position for the 2-D rotary embedding, so no image is resized to a common shape.

HF duplicates a still image into temporal_patch_size identical frames for its Conv3d; a convolution
over identical frames is the convolution of one frame with the kernel summed over time, which is
what runs here (the Conv3d kernel itself is kept, so checkpoints round-trip unchanged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oq2vl_jax.models.attention import attention
from oq2vl_jax.models.config import Qwen2VLVisionConfig
from oq2vl_jax.models.layers import LayerNorm, linear
from oq2vl_jax.sharding import constrain

LN_EPS = 1e-6  # HF hard-codes it for the blocks and the merger


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def vision_rope_angles(patch_positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """patch_positions int [B, P, 2] (h, w) -> float32 angles [B, P, head_dim]: a quarter of the
    head's frequency pairs turn with h, a quarter with w, laid out [h, w, h, w] as HF."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    f = patch_positions.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, head_dim/4]
    hw = jnp.concatenate([f[..., 0, :], f[..., 1, :]], axis=-1)
    return jnp.concatenate([hw, hw], axis=-1)


def apply_vision_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """x [B, P, N, H]; rotated in float32 and cast back (HF apply_rotary_pos_emb_vision)."""
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


class PatchProjection(nnx.Module):
    """HF PatchEmbed.proj: a bias-free Conv3d whose stride equals its kernel; kernel [T, p, p, C, D]."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        shape = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size, cfg.in_channels, cfg.embed_dim)
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype),
                                out_sharding=(None, None, None, None, "vit_embed"))
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, patches: jax.Array) -> jax.Array:
        """patches [B, P, C*p*p] (one frame) -> [B, P, D]."""
        c, p = self.cfg.in_channels, self.cfg.patch_size
        w = self.kernel[...].astype(jnp.float32).sum(0).astype(self.dtype)  # identical frames
        x = patches.astype(self.dtype).reshape(patches.shape[:2] + (c, p, p))
        return jnp.einsum("bncij,ijcd->bnd", x, w)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, **kw):
        self.proj = PatchProjection(cfg, **kw)

    def __call__(self, patches):
        return self.proj(patches)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, attn_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.embed_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = linear(d, 3 * d, ("vit_embed", "vit_heads"), **kw)  # fused [q; k; v] as HF
        self.proj = linear(d, d, ("vit_heads", "vit_embed"), **kw)
        self.num_heads = cfg.num_heads
        self.attn_impl = attn_impl

    def __call__(self, x, angles, segment_ids):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_vision_rope(q, angles), apply_vision_rope(k, angles)
        out = attention(q, k, v, segment_ids, causal=False, impl=self.attn_impl)
        return self.proj(out.reshape(b, n, d))


class VisionMlp(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = cfg.embed_dim * cfg.mlp_ratio
        self.fc1 = linear(cfg.embed_dim, hidden, ("vit_embed", "vit_mlp"), **kw)
        self.fc2 = linear(hidden, cfg.embed_dim, ("vit_mlp", "vit_embed"), **kw)

    def __call__(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class Qwen2VLVisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, attn_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.embed_dim, LN_EPS, param_dtype=param_dtype)
        self.norm2 = LayerNorm(cfg.embed_dim, LN_EPS, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = VisionMlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, angles, segment_ids):
        x = x + self.attn(self.norm1(x), angles, segment_ids)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("batch", "seq", None))


class _Gelu(nnx.Module):
    """The parameter-free nn.GELU at index 1 of HF's merger.mlp, so indices 0 and 2 keep HF's names."""

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
    """LayerNorm, then each 2x2 block's 4 consecutive patches concatenated -> Linear, GELU, Linear."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        wide = cfg.embed_dim * cfg.spatial_merge_size**2
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = LayerNorm(cfg.embed_dim, LN_EPS, param_dtype=param_dtype)
        self.mlp = nnx.List([linear(wide, wide, ("vit_embed", "vit_mlp"), **kw), _Gelu(),
                             linear(wide, cfg.hidden_size, ("vit_mlp", "embed"), **kw)])
        self.group = cfg.spatial_merge_size**2

    def __call__(self, x):
        b, n, d = x.shape
        x = self.ln_q(x).reshape(b, n // self.group, self.group * d)
        for layer in self.mlp:
            x = layer(x)
        return x


class Qwen2VisionTransformer(nnx.Module):
    """`__call__(patches [B, P, C*p*p], segment_ids [B, P], positions [B, P, 2])` -> merged tokens
    [B, P/4, hidden_size]: merged token j of a row is the 2x2 block of patches 4j..4j+3."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, attn_impl: str = "xla", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = nnx.List([Qwen2VLVisionBlock(cfg, attn_impl=attn_impl, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, patches, segment_ids, positions):
        group = self.cfg.spatial_merge_size**2
        if patches.shape[1] % group:
            raise ValueError(f"a patch row of {patches.shape[1]} is not a whole number of {group}-patch merge blocks")
        x = self.patch_embed(patches)
        angles = vision_rope_angles(positions, self.cfg.embed_dim // self.cfg.num_heads, self.cfg.rope_theta)
        for block in self.blocks:
            x = block(x, angles, segment_ids)
        return self.merger(x)
