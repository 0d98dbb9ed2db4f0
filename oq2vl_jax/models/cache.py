"""Key/value cache for incremental decoding of the Qwen2 decoder.

Every row of a batch writes the same cache slot at each step (prompts are left-padded to a common
length), so writes are one `dynamic_update_slice` and the "current length" is a single scalar.
Which slots hold real tokens is tracked per row in `mask`; RoPE positions are passed explicitly by
the caller, so a padded row still sees its own tokens at positions 0, 1, 2, ...
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from oq2vl_jax.models.config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, K, H], keys after RoPE
    v: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    mask: jax.Array  # bool [B, S]: the slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_size)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return cls(k=zeros, v=zeros, mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def attention_mask(self, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Marks the next T slots with `valid` [B, T]; returns (new slot mask [B, S], attention mask
        [B, T, S]): query t (at slot index+t) sees real tokens in slots <= index+t."""
        t = valid.shape[1]
        mask = jax.lax.dynamic_update_slice(self.mask, valid.astype(bool), (0, self.index))
        q_slot = self.index + jnp.arange(t, dtype=jnp.int32)
        causal = jnp.arange(self.max_len, dtype=jnp.int32)[None, :] <= q_slot[:, None]  # [T, S]
        return mask, mask[:, None, :] & causal[None]


def write(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes new [B, T, K, H] into buf [B, S, K, H] at slots index..index+T-1."""
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index, 0, 0))
