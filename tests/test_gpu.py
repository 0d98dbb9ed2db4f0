"""GPU checks of the cuDNN attention paths against the XLA reference: values and gradients, bf16.

Skipped without a GPU (CI has none). On a GPU machine the test session must be allowed to use it
(conftest defaults JAX_PLATFORMS to cpu):

    JAX_PLATFORMS=cuda,cpu python -m pytest -q -m gpu tests/test_gpu.py

The reference is the XLA path run in float32 on the same bf16-rounded inputs, so the tolerances are
those of bf16 attention (inputs and outputs rounded to 8 mantissa bits), not of two bf16 kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oq2vl_jax.models import ModelConfig, TextConfig, VisionConfig, build
from oq2vl_jax.models.attention import attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda,cpu)"),
]


def packed_segments(rng, rows: int, t: int, n_segments: int, fill: float) -> np.ndarray:
    """Segment ids [rows, t]: n_segments contiguous runs of random lengths over `fill` of the row,
    then padding (0). The last row is one full-length segment."""
    seg = np.zeros((rows, t), np.int32)
    for r in range(rows - 1):
        used = int(t * fill)
        cuts = np.sort(rng.choice(np.arange(1, used), n_segments - 1, replace=False))
        for s, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, used])):
            seg[r, a:b] = s + 1
    seg[-1] = 1
    return seg


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("t,n_segments", [(4096, 22), (1024, 7)])
def test_cudnn_packed_attention_equals_xla(t, n_segments):
    """Qwen2.5-1.5B attention shapes (12 query heads, 2 kv heads, head dim 128) on packed rows."""
    rng = np.random.default_rng(0)
    b, n, kv, h = 3, 12, 2, 128
    seg = jnp.asarray(packed_segments(rng, b, t, n_segments, fill=0.97))
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.bfloat16) for heads in (n, kv, kv))
    valid = (seg != 0)[:, :, None, None]
    w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * valid

    def run(impl, dtype):
        def loss(q, k, v):
            out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, causal=True, impl=impl,
                            max_segments=32)
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    out, grads = run("cudnn", jnp.bfloat16)
    ref, ref_grads = run("xla", jnp.float32)
    out, ref = np.asarray(jnp.where(valid, out, 0), np.float32), np.asarray(jnp.where(valid, ref, 0))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=3e-2, rtol=0)
    assert rel_err(out, ref) < 1e-2
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        g = np.asarray(g, np.float32)
        assert np.isfinite(g).all(), name
        assert rel_err(g, g_ref) < 2e-2, (name, rel_err(g, g_ref))
        # Padding positions get exactly zero gradient, as from the reference.
        np.testing.assert_array_equal(g * ~np.asarray(valid), 0)


def test_cudnn_vision_attention_equals_xla():
    """SigLIP-so400m attention shapes: 729 patches, 16 heads of dim 72, no mask."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(8, 729, 16, 72)), jnp.bfloat16) for _ in range(3))
    out = jax.jit(lambda q, k, v: attention(q, k, v, causal=False, impl="cudnn"))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(lambda q, k, v: attention(q, k, v, causal=False, impl="xla"))(*f32)
    assert rel_err(out, ref) < 1e-2


def small_config(attention_impl: str) -> ModelConfig:
    """A small VLM whose attention shapes cuDNN accepts (text head dim 128 with GQA, vision 72)."""
    vision = VisionConfig(hidden_size=288, intermediate_size=576, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14)
    text = TextConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)
    return ModelConfig(vision=vision, text=text, image_tokens=4, image_token_id=500, dtype="bfloat16",
                       param_dtype="float32", vision_dtype="bfloat16", attention=attention_impl,
                       max_segments=16, remat="none")


def packed_batch(rng, cfg: ModelConfig, rows: int, t: int, per_row: int) -> dict:
    """Rows of `per_row` samples [<s>, image slots, caption] with per-sample positions, then padding."""
    k = cfg.image_tokens
    batch = {n: np.zeros((rows, t), np.int32) for n in ("input_ids", "segment_ids", "positions", "loss_mask")}
    for r in range(rows):
        start = 0
        for s in range(per_row):
            ids = np.r_[1, np.full(k, cfg.image_token_id), rng.integers(2, 400, rng.integers(5, 40))]
            sl = slice(start, start + len(ids))
            batch["input_ids"][r, sl], batch["segment_ids"][r, sl] = ids, s + 1
            batch["positions"][r, sl], batch["loss_mask"][r, sl] = np.arange(len(ids)), ids != cfg.image_token_id
            start += len(ids)
    size = cfg.vision.image_size
    batch["images"] = rng.uniform(-1, 1, (rows, per_row, size, size, 3)).astype(np.float32)
    return {n: jnp.asarray(a) for n, a in batch.items()}


def test_vlm_loss_and_gradients_cudnn_equal_xla():
    """The whole model on packed rows: loss and every trainable gradient agree between the paths."""
    rng = np.random.default_rng(2)
    cfg = small_config("xla")
    batch = packed_batch(rng, cfg, rows=4, t=512, per_row=8)
    assert int(batch["segment_ids"].min()) == 0  # rows end in padding

    def loss_and_grads(impl):
        model = build(dataclasses.replace(cfg, attention=impl), seed=0)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def f(params):
            total, count = nnx.merge(graphdef, params, rest).loss(batch)
            return total / count
        return jax.value_and_grad(f)(params)

    loss, grads = loss_and_grads("cudnn")
    ref_loss, ref_grads = loss_and_grads("xla")
    assert abs(float(loss) - float(ref_loss)) < 1e-2 * abs(float(ref_loss))
    flat, ref_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(ref_grads))
    for path, g in flat.items():
        g, g_ref = g.get_value(), ref_flat[path].get_value()
        assert np.isfinite(np.asarray(g)).all(), path
        if np.linalg.norm(np.asarray(g_ref)) > 0:
            assert rel_err(g, g_ref) < 5e-2, (path, rel_err(g, g_ref))
