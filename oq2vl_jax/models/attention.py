"""Dot-product attention behind one function, with packed-row segment isolation.

Layout BTNH: q [B, T, N, H], k/v [B, S, K, H] with N a multiple of K (grouped-query attention).
Segment ids are int32 [B, T], contiguous runs numbered 1..n per row, 0 = padding.

Implementations:
* "xla": the reference; an explicit masked softmax in float32 that runs on every backend.
* "cudnn": GPU fast path. Packed rows use cuDNN's packed ("THD-like") layout through per-segment
  lengths and offsets, so blocks across segments are never computed (see
  docs/attention_kernels.md, which also explains the workarounds below). Unmasked (vision) and plain causal rows use
  the public `jax.nn.dot_product_attention(implementation="cudnn")`. Where cuDNN can't run (not a
  GPU, float32 inputs, old JAX) it falls back to "xla" with a one-time warning.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def make_mask(segment_ids: jax.Array, *, causal: bool, cross_segment: bool) -> jax.Array:
    """Boolean [B, T, T] mask: query t may attend key s."""
    t = segment_ids.shape[1]
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    if cross_segment:
        # The original: every real token sees all earlier real tokens of the row; padding sees all.
        mask = (seg_k != 0) | (seg_q == 0)
    else:
        mask = seg_q == seg_k
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    return mask


def xla_attention(q, k, v, mask: jax.Array | None, scale: float) -> jax.Array:
    """Reference attention; softmax in float32. mask: bool [B, T, S] or None."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def packed_seqlens_offsets(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Per-row segment lengths [B, M] and start offsets [B, M+1] for cuDNN's packed layout.

    Unused slots are -1, as the cuDNN wrapper expects. Assumes each segment id is one contiguous run.
    """
    ids = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
    hit = segment_ids[:, :, None] == ids[None, None, :]  # [B, T, M]
    lens = hit.sum(axis=1).astype(jnp.int32)
    starts = jnp.argmax(hit, axis=1).astype(jnp.int32)
    present = lens > 0
    seqlens = jnp.where(present, lens, -1)
    pad = jnp.full((segment_ids.shape[0], 1), -1, jnp.int32)
    offsets = jnp.concatenate([jnp.where(present, starts, -1), pad], axis=1)
    return seqlens, offsets


def _backend() -> str:
    """The platform attention is compiled for (bench/gpu_aot.py answers for a GPU it compiles for)."""
    return jax.default_backend()


def _gpu_capability() -> tuple[int, ...]:
    return tuple(int(x) for x in str(getattr(jax.devices()[0], "compute_capability", "0.0")).split("."))


@functools.cache
def _cudnn_unavailable_reason(dtype_name: str, packed: bool) -> str | None:
    if _backend() != "gpu":
        return f"backend is {_backend()!r}, not gpu"
    if dtype_name not in ("bfloat16", "float16"):
        return f"cuDNN flash attention needs bf16/fp16 inputs, got {dtype_name}"
    try:
        from jax._src.cudnn import fused_attention_stablehlo  # noqa: F401
    except ImportError as e:  # private module: pinned JAX versions only
        return f"jax._src.cudnn.fused_attention_stablehlo is not importable ({e})"
    if packed and (cc := _gpu_capability()) < (9, 0):  # jax refuses the packed layout before Hopper
        return f"cuDNN's packed layout (segment ids) needs compute capability 9.0+, this GPU has {cc}"
    return None


@functools.cache
def _warn_fallback(reason: str) -> None:
    log.warning("attention='cudnn' unavailable (%s); falling back to the XLA reference path", reason)


def _cudnn_attention(q, k, v, segment_ids, *, causal, cross_segment, max_segments, scale):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_sdpa

    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
    if cross_segment or not causal:
        if not causal:
            raise NotImplementedError("cudnn path: segment ids without causal masking")
        # Plain causal over the real tokens of the row (padding is at the end of each row).
        lens = (segment_ids != 0).sum(axis=1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, query_seq_lengths=lens,
            key_value_seq_lengths=lens, implementation="cudnn",
        )
    # jax's packed layout scales the k/v offsets by the *query* head stride (fixed upstream in jax PR
    # #39521, after 0.10.2), so grouped-query k/v would be read from the wrong tokens: give k/v as
    # many heads as q.
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    # Padding tokens belong to no segment, so cuDNN leaves their outputs and input gradients
    # undefined: select them away in both directions (a select, unlike a product, stops a NaN).
    valid = (segment_ids != 0)[:, :, None, None]
    q, k, v = (jnp.where(valid, x, jax.lax.stop_gradient(x)) for x in (q, k, v))
    seqlens, offsets = packed_seqlens_offsets(segment_ids, max_segments)
    out = cudnn_sdpa(
        q, k, v, None, None, seqlens, seqlens, offsets, offsets,
        scale=scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )
    return jnp.where(valid, out, 0).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _xla_backward(fwd, ref, q, k, v, segment_ids):
    """fwd's values with ref's gradient. jax (0.10, 0.11) refuses cuDNN attention gradients at odd
    lengths (e.g. SigLIP's 729 patches): a check meant for attention biases counts the placeholder it
    puts in for a missing bias as one. Those take the XLA reference's backward pass instead."""
    return fwd(q, k, v, segment_ids)


def _xla_backward_fwd(fwd, ref, q, k, v, segment_ids):
    return fwd(q, k, v, segment_ids), (q, k, v, segment_ids)


def _xla_backward_bwd(fwd, ref, res, g):
    q, k, v, segment_ids = res
    dq, dk, dv = jax.vjp(lambda q, k, v: ref(q, k, v, segment_ids), q, k, v)[1](g)
    return dq, dk, dv, None


_xla_backward.defvjp(_xla_backward_fwd, _xla_backward_bwd)


def _reference(q, k, v, segment_ids, *, causal, cross_segment, scale):
    if segment_ids is None:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None] if causal else None
    else:
        mask = make_mask(segment_ids, causal=causal, cross_segment=cross_segment)
    return xla_attention(q, k, v, mask, scale)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool,
    impl: str = "xla",
    cross_segment: bool = False,
    max_segments: int = 64,
) -> jax.Array:
    """Scaled dot-product attention (scale 1/sqrt(head_dim)) with optional segment isolation."""
    scale = q.shape[-1] ** -0.5
    ref = functools.partial(_reference, causal=causal, cross_segment=cross_segment, scale=scale)
    if impl == "cudnn" and segment_ids is not None and not causal:
        # Packed patch rows of a vision tower (Qwen2-VL): no cuDNN path written for them yet.
        _warn_fallback("non-causal attention with segment ids (packed image patches) has no cuDNN path here")
    elif impl == "cudnn":
        packed = segment_ids is not None and causal and not cross_segment
        reason = _cudnn_unavailable_reason(jnp.dtype(q.dtype).name, packed)
        if reason is None:
            fwd = functools.partial(_cudnn_attention, causal=causal, cross_segment=cross_segment,
                                    max_segments=max_segments, scale=scale)
            if q.shape[1] % 2 or k.shape[1] % 2:
                return _xla_backward(fwd, ref, q, k, v, segment_ids)
            return fwd(q, k, v, segment_ids)
        _warn_fallback(reason)
    elif impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r} (expected 'xla' or 'cudnn')")
    return ref(q, k, v, segment_ids)
