"""The cuDNN attention paths traced and lowered for CUDA on a machine without a GPU.

No GPU has run `attention(..., impl="cudnn")` yet (tests/test_gpu.py waits for one). Lowering it for
the "cuda" platform still runs everything jax does before the kernel: the argument, shape, dtype,
rank and layout checks of `jax._src.cudnn.fused_attention_stablehlo`, its flash-attention support
rules (head dim, sequence lengths, packed layout), the custom_vjp, and the emission of the
`__cudnn$fmhaSoftmax[Backward]` custom calls. What it cannot check: cuDNN's own graph support test
and the values, which need a GPU (XLA compiles the custom call there).

jax queries the device at trace time in three places, all patched here (tests only):
  * `check_cudnn_version()` reads libcudnn through the CUDA plugin; its value only matters for
    compute capability 10.3 and for q/v head dims that differ. Given as 9.12.
  * `check_compute_capability` / `is_cuda_compute_capability_equal` ask the default backend; on
    CPU they answer False, which would refuse the packed layout ("requires ... Hopper"). Given as
    sm 9.0 (H100), the machine this project targets.
  * our `_cudnn_unavailable_reason` falls back to XLA off-GPU; made to answer None (its own
    capability rule is tested separately).

Runs on CPU with jax 0.10.2 (Python 3.11) and 0.11.2 (Python 3.12), no CUDA packages needed:

    python -m pytest -q tests/test_cuda_lowering.py
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oq2vl_jax.models.attention as attn_mod
from oq2vl_jax.models import build

fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
if not all(hasattr(fa, n) for n in ("check_cudnn_version", "check_compute_capability",
                                    "is_cuda_compute_capability_equal", "dot_product_attention")):
    pytest.skip("jax's private cuDNN attention module changed; update the patches", allow_module_level=True)

FWD, BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"


def _pretend_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    def parse(c):
        return tuple(int(x) for x in c.split("."))
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91200)
    monkeypatch.setattr(fa, "check_compute_capability", lambda c: capability >= parse(c))
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda c: capability == parse(c))
    monkeypatch.setattr(attn_mod, "_cudnn_unavailable_reason", lambda dtype_name, packed: None)


@pytest.fixture
def hopper(monkeypatch):
    _pretend_gpu(monkeypatch, (9, 0))


def cudnn_calls(fn, *args) -> collections.Counter:
    """Lower jit(fn) for CUDA; count the cuDNN custom calls in the StableHLO."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return collections.Counter(
        line.split("custom_call @")[1].split("(")[0] for line in text.splitlines() if "custom_call @__cudnn" in line)


def with_vjp(f):
    """f and its reverse pass (cotangent = the output), as cuDNN's training kernels see them."""
    def g(q, k, v, *rest):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, *rest), q, k, v)
        return out, vjp(out)
    return g


def sds(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


# Qwen2.5-1.5B text attention (12 q heads, 2 kv heads, dim 128) on packed 4096-token rows.
TEXT = dict(b=2, t=4096, n=12, kv=2, h=128)


@pytest.mark.parametrize("cross_segment", [False, True], ids=["packed", "cross_segment"])
def test_text_attention_lowers_with_gradient(hopper, cross_segment):
    b, t, n, kv, h = TEXT.values()

    def f(q, k, v, seg):
        return attn_mod.attention(q, k, v, seg, causal=True, impl="cudnn", cross_segment=cross_segment,
                                  max_segments=32)

    args = (sds(b, t, n, h), sds(b, t, kv, h), sds(b, t, kv, h), sds(b, t, dtype=jnp.int32))
    assert cudnn_calls(f, *args) == {FWD: 1}
    assert cudnn_calls(with_vjp(f), *args) == {FWD: 1, BWD: 1}


def test_vision_attention_forward_lowers(hopper):
    """SigLIP-so400m: 729 patches, 16 heads of dim 72, no mask. Dim 72 passes jax's rule (a multiple
    of 8, <= 128; <= 256 from sm 9.0). Forward only: the tower is frozen by default."""
    q = sds(8, 729, 16, 72)
    assert cudnn_calls(lambda q, k, v: attn_mod.attention(q, k, v, causal=False, impl="cudnn"), q, q, q) == {FWD: 1}


def test_vision_attention_gradient_lowers(hopper):
    """A trained vision tower (optim.freeze without the tower) with attention=cudnn. jax refuses
    cuDNN's training kernels at odd lengths (729 patches: 'Unsupported sequence length Q 729, KV 729',
    a check meant for attention biases that counts the placeholder for a missing bias as one), so odd
    lengths run cuDNN's forward and the XLA reference's backward pass."""
    q = sds(8, 729, 16, 72)
    f = with_vjp(lambda q, k, v: attn_mod.attention(q, k, v, causal=False, impl="cudnn"))
    assert cudnn_calls(f, q, q, q) == {FWD: 1}


@pytest.mark.parametrize("segments", [False, True], ids=["unmasked", "packed"])
def test_odd_length_values_and_gradients_equal_the_reference(monkeypatch, segments):
    """The odd-length plumbing run on CPU: cuDNN's forward stood in for by the reference, so values
    and gradients must equal the XLA path's exactly (segment ids pass through, get no cotangent)."""
    from oq2vl_jax.models.attention import _reference

    monkeypatch.setattr(attn_mod, "_cudnn_unavailable_reason", lambda dtype_name, packed: None)
    monkeypatch.setattr(attn_mod, "_cudnn_attention", lambda q, k, v, seg, *, causal, cross_segment,
                        max_segments, scale: _reference(q, k, v, seg, causal=causal,
                                                        cross_segment=cross_segment, scale=scale))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 11, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 11, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11], jnp.int32) if segments else None
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attn_mod.attention(q, k, v, seg, causal=segments, impl=impl) * w)

    want = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)  # both jitted: one summation order
    got = jax.jit(jax.value_and_grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_packed_layout_before_hopper_falls_back_to_xla(monkeypatch):
    """jax refuses cuDNN's packed layout before sm 9.0 (an A100 is 8.0): packed rows take the XLA
    path there, with the reason logged; unmasked (vision) attention still uses cuDNN."""
    monkeypatch.setattr(attn_mod.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attn_mod, "_gpu_capability", lambda: (8, 0))
    attn_mod._cudnn_unavailable_reason.cache_clear()
    try:
        assert "9.0" in attn_mod._cudnn_unavailable_reason("bfloat16", True)
        assert attn_mod._cudnn_unavailable_reason("bfloat16", False) is None
    finally:
        attn_mod._cudnn_unavailable_reason.cache_clear()


def test_vlm_loss_and_gradient_lower(hopper):
    """The whole model, as in tests/test_gpu.py (bf16, packed rows, every parameter differentiated),
    and with 729 patches with the vision tower frozen (as in training) and trained."""
    from test_gpu import packed_batch, small_config

    cfg = small_config("cudnn")
    big_images = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=378))  # 27x27
    rng = np.random.default_rng(0)
    for c, vision_trained in ((cfg, True), (big_images, False), (big_images, True)):
        batch = packed_batch(rng, c, rows=2, t=512, per_row=4)
        graphdef, params, rest = nnx.split(build(c, seed=0), nnx.Param, ...)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        if vision_trained:
            train, frozen = abstract, None
        else:
            train, frozen = nnx.split_state(abstract, lambda path, _: path[0] != "vision_tower", ...)

        def objective(train, frozen):
            p = train if frozen is None else nnx.merge_state(train, frozen)
            total, count = nnx.merge(graphdef, p, rest).loss(batch)
            return total / count

        calls = cudnn_calls(jax.value_and_grad(objective), train, frozen)
        assert calls[FWD] > 0 and calls[BWD] > 0, (c.vision.image_size, calls)
        if not vision_trained:
            assert calls[BWD] < calls[FWD], calls  # the frozen tower runs forward kernels only


@pytest.mark.parametrize("config, overrides", [  # full-size lowerings are tens of seconds each: one in the default suite
    pytest.param("pretrain", [], marks=pytest.mark.slow, id="pretrain"),
    pytest.param("pretrain", ["optim.freeze=[]"], marks=pytest.mark.slow, id="pretrain-tower-trained"),
    pytest.param("sft", [], id="sft")])
def test_full_size_train_step_lowers(hopper, tmp_path, config, overrides):
    """The real jitted train step of the shipped configs at full size (SigLIP-so400m + Qwen2.5-1.5B,
    4096-token rows; abstract, nothing allocated), on one device: every attention is cuDNN's."""
    import importlib.util
    import os

    from oq2vl_jax.config import load_config
    from oq2vl_jax.train import Trainer
    from oq2vl_jax.train_step import MODEL_KEYS, batch_shardings

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("train_bench", os.path.join(root, "bench", "train_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # its synthetic rows: packed like the real data
    cfg = load_config(os.path.join(root, "configs", f"{config}.yaml"),
                      ["data.global_batch_size=2", "train.micro_batches=1", "train.init_from=null", "tokenizer=null",
                       "mesh.fsdp=1", *overrides])
    trainer = Trainer(cfg, str(tmp_path))
    rows = bench.synthetic_rows(cfg, 2, min(22, cfg.data.max_images))
    example = {k: v[None] for k, v in rows.items()}
    shardings = batch_shardings(trainer.mesh, example, True)
    batch = {k: jax.ShapeDtypeStruct(example[k].shape, example[k].dtype, sharding=shardings[k]) for k in MODEL_KEYS
             if k in example}
    text = trainer.train_step.trace(trainer.abstract_state, batch).lower(lowering_platforms=("cuda",)).as_text()
    trainer.mngr.close()
    calls = collections.Counter(line.split("custom_call @")[1].split("(")[0]
                                for line in text.splitlines() if "custom_call @__cudnn" in line)
    layers = cfg.model.text.num_hidden_layers
    assert calls[BWD] == layers, calls  # the LLM's; the tower is frozen or odd-length (XLA backward)
    assert calls[FWD] > layers, calls  # plus the tower's forward
    assert "stablehlo.dot_general" in text
