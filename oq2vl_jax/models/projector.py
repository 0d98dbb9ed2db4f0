"""Projector: torch-exact AdaptiveAvgPool2d over the patch grid, then Linear -> GELU -> Linear.

Open-Qwen2VL pools first, in vision space (27x27 -> 12x12 = 144 tokens for pre-training; 27 -> 27 is
the identity for SFT), then applies the 2-layer MLP. torch's adaptive pooling uses bins
[floor(i*n/m), ceil((i+1)*n/m)), which overlap for 27 -> 12; it is separable, so it is exactly one
einsum with a fixed [m, n] averaging matrix on each side.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oq2vl_jax.models.layers import gelu, linear


def adaptive_pool_matrix(n: int, m: int) -> np.ndarray:
    """[m, n] matrix whose row i averages torch's adaptive-pool bin i of an n-long axis."""
    a = np.zeros((m, n), np.float32)
    for i in range(m):
        start, end = (i * n) // m, -((-(i + 1) * n) // m)
        a[i, start:end] = 1.0 / (end - start)
    return a


def adaptive_avg_pool(x: jax.Array, out_side: int) -> jax.Array:
    """x: [N, T, C] tokens of a square row-major grid -> [N, out_side**2, C]."""
    n, t, c = x.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"{t} tokens do not form a square grid")
    if out_side == side:
        return x
    # The weights stay float32: in bf16, 1/3 rounds to 0.33398 and every 27->12 bin would be scaled
    # by 1.0039 (a bias, not noise).
    a = jnp.asarray(adaptive_pool_matrix(side, out_side), jnp.float32)
    grid = x.reshape(n, side, side, c).astype(jnp.float32)
    pooled = jnp.einsum("ih,nhwc,jw->nijc", a, grid, a)
    return pooled.astype(x.dtype).reshape(n, out_side * out_side, c)


class MultiModalProjector(nnx.Module):
    """Named as HF Llava's `multi_modal_projector` (linear_1, linear_2)."""

    def __init__(self, vision_dim: int, text_dim: int, out_side: int, act: str, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Two different logical names per kernel: both dims may not map to the same mesh axis.
        self.linear_1 = linear(vision_dim, text_dim, ("vit_embed", "mlp"), **kw)
        self.linear_2 = linear(text_dim, text_dim, ("mlp", "embed"), **kw)
        self.out_side = out_side
        self.act = act

    def __call__(self, features: jax.Array) -> jax.Array:
        x = adaptive_avg_pool(features, self.out_side)
        return self.linear_2(gelu(self.linear_1(x), self.act))
