"""Small building blocks shared by the towers: linear layers with logical axis names, norms, GELU.

Parameter leaves follow Flax conventions (`kernel` [in, out], `scale`, `bias`, `embedding`); module
attribute names follow HF, so HF `a.b.weight` is our `a.b.kernel` (transposed) / `a.b.scale` /
`a.b.embedding` (see weights.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
    return DTYPES[name]


def linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """nnx.Linear whose kernel [in, out] and bias [out] carry logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (as torch autocast does), result cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, names=("norm",)):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=names)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=names)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Qwen2RMSNorm: normalise in float32, cast back to the input dtype, then scale (HF's order)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def gelu(x: jax.Array, kind: str) -> jax.Array:
    """'gelu' = exact erf (torch nn.GELU default); 'gelu_pytorch_tanh' = tanh approximation."""
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if kind == "gelu_pytorch_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {kind!r}")
