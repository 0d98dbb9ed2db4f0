"""Full-size configs build abstractly with HF's exact parameter counts; FSDP sharding on 8 devices."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import our_config
from oq2vl_jax.models import ModelConfig, TextConfig, assign_params, build, build_abstract, build_sharded, count_params, flat_params
from oq2vl_jax.models.attention import attention, make_mask, packed_seqlens_offsets
from oq2vl_jax.sharding import make_mesh


# The full-size model: Qwen2.5-1.5B (its 151,936-row embedding) + so400m, pooled to 144 tokens.
FULL = ModelConfig(text=TextConfig(vocab_size=151936), image_tokens=144, image_token_id=151655)


def _component_count(state, name):
    return sum(int(np.prod(v.shape)) for p, v in flat_params(state).items() if p[0] == name)


def test_full_size_parameter_counts():
    _, state = build_abstract(FULL)  # eval_shape: nothing is allocated
    assert _component_count(state, "language_model") == 1_543_714_304  # HF Qwen2.5-1.5B
    assert _component_count(state, "vision_tower") == 412_987_248  # HF so400m without its head
    assert _component_count(state, "multi_modal_projector") == 4_131_840


def test_fsdp8_shards_every_large_weight_of_full_model():
    mesh = make_mesh(fsdp=8)
    _, state = build_abstract(FULL, mesh)
    for path, leaf in flat_params(state).items():
        spec = leaf.sharding.spec
        if np.prod(leaf.shape) >= 1_000_000:
            assert "fsdp" in jax.tree.leaves(tuple(spec)), (path, spec)
    specs = {p: v.sharding.spec for p, v in flat_params(state).items()}
    lm = ("language_model", "model")
    assert specs[lm + ("embed_tokens", "embedding")] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert specs[lm + ("layers", 0, "self_attn", "q_proj", "kernel")] == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert specs[lm + ("layers", 0, "self_attn", "k_proj", "kernel")] == jax.sharding.PartitionSpec("fsdp", None)
    assert specs[lm + ("layers", 0, "mlp", "down_proj", "kernel")] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert specs[("vision_tower", "encoder", "layers", 0, "mlp", "fc1", "kernel")] == \
        jax.sharding.PartitionSpec("fsdp", "tensor")


def test_sharded_forward_equals_single_device():
    cfg = our_config(image_tokens=4)
    rng = np.random.default_rng(0)
    b, t = 8, 24
    ids = rng.integers(0, 99, (b, t)).astype(np.int32)
    ids[:, 2:6] = 100  # one image per row
    seg = np.ones((b, t), np.int32)
    seg[:, 14:] = 2
    seg[:, 20:] = 0
    pos = np.concatenate([np.arange(14), np.arange(6), np.zeros(4, int)])[None].repeat(b, 0).astype(np.int32)
    images = rng.uniform(-1, 1, (b, 1, 56, 56, 3)).astype(np.float32)

    single = build(cfg, seed=1)
    ref = np.asarray(single(ids, images, pos, seg))

    mesh = make_mesh(fsdp=8)
    sharded = build_sharded(cfg, mesh, seed=2)
    assign_params(sharded, {p: np.asarray(v) for p, v in flat_params(single).items()})
    kernel = flat_params(sharded)[("language_model", "model", "layers", 0, "mlp", "gate_proj", "kernel")]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (4, 64)

    from flax import nnx

    from oq2vl_jax.sharding import batch_sharding, use_mesh

    with use_mesh(mesh):
        args = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in (ids, images, pos, seg)]
        out = nnx.jit(lambda m, *a: m(*a))(sharded, *args)
    assert out.sharding.shard_shape(out.shape)[0] == b // 8  # batch split over the 8 devices
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_cudnn_packed_arguments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    seqlens, offsets = packed_seqlens_offsets(seg, 4)
    np.testing.assert_array_equal(seqlens, [[3, 2, 1, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])


def test_cudnn_falls_back_with_a_message_on_cpu(caplog):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.float32)
    k = v = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32)
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]] * 2, jnp.int32)
    with caplog.at_level(logging.WARNING):
        out = attention(q, k, v, seg, causal=True, impl="cudnn")
    assert "falling back" in caplog.text
    np.testing.assert_array_equal(out, attention(q, k, v, seg, causal=True, impl="xla"))
    with pytest.raises(ValueError, match="unknown attention"):
        attention(q, k, v, seg, causal=True, impl="flash")


def test_masks():
    seg = jnp.array([[1, 1, 2, 0]])
    iso = np.asarray(make_mask(seg, causal=True, cross_segment=False))[0]
    np.testing.assert_array_equal(iso, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    cross = np.asarray(make_mask(seg, causal=True, cross_segment=True))[0]
    np.testing.assert_array_equal(cross, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])


def test_cudnn_packed_wrapper_against_an_emulated_kernel(monkeypatch):
    """No GPU here: replace jax's cuDNN call by a reference of its packed-layout contract (segments
    given by seqlens/offsets, causal inside each, undefined output on padding) and check that our
    wrapper's arguments make it equal the XLA path in values and gradients, GQA included."""
    from jax._src.cudnn import fused_attention_stablehlo as fas

    from oq2vl_jax.models import attention as attn_mod
    from oq2vl_jax.models.attention import xla_attention

    def fake_cudnn(q, k, v, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *, scale, mask_type, qkv_layout):
        assert bias is None and mask is None and qkv_layout == "BTNH" and mask_type == fas.MaskType.PADDING_CAUSAL
        assert k.shape[2] == q.shape[2], "k/v must have as many heads as q (jax's offset stride)"
        t = jnp.arange(q.shape[1])
        starts, lens = q_offsets[:, :-1, None], q_seqlen[:, :, None]
        member = (lens > 0) & (t >= starts) & (t < starts + lens)  # [B, M, T]
        seg = jnp.where(member.any(1), jnp.argmax(member, 1) + 1, 0)
        m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & (t[:, None] >= t[None, :])
        out = xla_attention(q, k, v, m, scale)
        return jnp.where((seg > 0)[:, :, None, None], out, jnp.nan)  # padding: undefined

    monkeypatch.setattr(fas, "dot_product_attention", fake_cudnn)
    monkeypatch.setattr(attn_mod, "_cudnn_unavailable_reason", lambda dtype, packed: None)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32)
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0], [1] * 7 + [2] * 5], jnp.int32)
    w = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32) * (seg != 0)[:, :, None, None]

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention(q, k, v, seg, causal=True, impl=impl, max_segments=4) * w)

    for impl in ("xla", "cudnn"):
        out = attention(q, k, v, seg, causal=True, impl=impl, max_segments=4)
        assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(attention(q, k, v, seg, causal=True, impl="cudnn", max_segments=4) * (seg != 0)[..., None, None],
                               attention(q, k, v, seg, causal=True, impl="xla") * (seg != 0)[..., None, None], atol=1e-6)
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_cud = jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_cud, g_ref):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _rows_with_images(counts, m, t=40, k=4, image_token_id=100, seed=0):
    """Packed-style rows: row b holds counts[b] images (k placeholders each) and text, in one segment."""
    rng = np.random.default_rng(seed)
    b = len(counts)
    ids = rng.integers(0, 99, (b, t)).astype(np.int32)
    for r, c in enumerate(counts):
        ids[r, 1:1 + c * k] = image_token_id
    return {"input_ids": ids, "segment_ids": np.ones((b, t), np.int32),
            "positions": np.arange(t)[None].repeat(b, 0).astype(np.int32),
            "loss_mask": (ids != image_token_id).astype(np.int32),
            "images": rng.uniform(-1, 1, (b, m, 56, 56, 3)).astype(np.float32)}


@pytest.mark.slow  # default-suite time (about 10 minutes on 2 cores); run with -m slow
def test_chunked_tower_equals_dense_and_skips_empty_slots(monkeypatch):
    """vision_chunk_size: same loss and gradients as running the tower on every slot (one device and
    FSDP over 8), while chunks holding no real image are never run."""
    import dataclasses

    from flax import nnx

    from oq2vl_jax.models.siglip import SiglipVisionModel
    from oq2vl_jax.sharding import batch_sharding, use_mesh

    cfg = our_config(image_tokens=4)
    batch = _rows_with_images([0, 1, 3, 2, 0, 0, 1, 0], m=3)
    chunk = 2  # one device: 24 slots in 12 chunks; 8 devices: 3 slots each, in 2 chunks (one padded)

    def loss_and_grads(model, mesh=None):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(params, batch):
            total, count = nnx.merge(graphdef, params, rest).loss(batch)
            return total / count
        if mesh is None:
            return jax.jit(jax.value_and_grad(f))(params, batch)
        with use_mesh(mesh):
            sharded = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
            return jax.jit(jax.value_and_grad(f))(params, sharded)

    dense = build(cfg, seed=1)
    ref_loss, ref_grads = loss_and_grads(dense)
    chunked_cfg = dataclasses.replace(cfg, vision_chunk_size=chunk)

    images_run = []
    original = SiglipVisionModel.__call__

    def counting(self, pixels):
        jax.debug.callback(lambda n: images_run.append(int(n)), pixels.shape[0])
        return original(self, pixels)

    monkeypatch.setattr(SiglipVisionModel, "__call__", counting)
    single = build(chunked_cfg, seed=1)
    loss, grads = loss_and_grads(single)
    jax.effects_barrier()
    # 24 slots, 7 real images: only the 4 chunks up to the 7th image run.
    assert sum(images_run) == 8
    monkeypatch.setattr(SiglipVisionModel, "__call__", original)

    mesh = make_mesh(fsdp=8)
    sharded = build_sharded(chunked_cfg, mesh, seed=2)
    assign_params(sharded, {p: np.asarray(v) for p, v in flat_params(single).items()})
    sharded_loss, sharded_grads = loss_and_grads(sharded, mesh)
    for lo, gr in ((loss, grads), (sharded_loss, sharded_grads)):
        np.testing.assert_allclose(float(lo), float(ref_loss), rtol=1e-5)
        ref_flat = dict(nnx.to_flat_state(ref_grads))
        for path, g in nnx.to_flat_state(gr):
            np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(ref_flat[path].get_value()),
                                       atol=2e-5, err_msg=str(path))


def test_chunked_bf16_tower_gives_the_features_of_the_plain_bf16_tower():
    """tower_features_chunked casts the tower's matrices to its compute dtype before the chunks (the
    cast each layer would do); the features of the real slots are bit-identical to the plain tower's."""
    cfg = our_config(image_tokens=4, vision_dtype="bfloat16", vision_chunk_size=2)
    model = build(cfg, seed=0)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 3, 56, 56, 3)), jnp.float32)
    counts = jnp.array([3, 1])
    chunked = np.asarray(jax.jit(model.tower_features_chunked)(images, counts).astype(jnp.float32))
    plain = np.asarray(jax.jit(model.vision_tower)(images.reshape((6, 56, 56, 3))).astype(jnp.float32))
    real = [0, 1, 2, 3]  # row 0's three slots, row 1's first
    np.testing.assert_array_equal(chunked[real], plain[real])
    assert not chunked[[4, 5]].any()  # empty slots: zeros, the tower never ran there
