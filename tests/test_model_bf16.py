"""bfloat16 numerics against HF torch in bfloat16 on the CPU.

Norms, the attention softmax and the loss run in float32 whatever the input dtype, exactly as HF
does (Qwen2RMSNorm, nn.LayerNorm's CPU kernel, eager attention's float32 softmax): on bf16 inputs
they give the same bits as torch. Whole towers differ by bf16 rounding inside matmuls (HF's eager
attention rounds the scores to bf16 before its softmax, ours keeps them in float32), so they are
compared within BF16_TOL of the output's largest magnitude, about two bf16 ulps there, and must be
no further from the float32 result than HF's own bf16 run is (up to BF16_SLACK).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from hf_tiny import hf_qwen2, hf_siglip, our_config, state_dict_np
from oq2vl_jax.models import load_hf
from oq2vl_jax.models.attention import make_mask, xla_attention
from oq2vl_jax.models.layers import LayerNorm, RMSNorm
from oq2vl_jax.models.vlm import token_losses
from torch_vlm import TorchVLM, caption_sample, zeros_model

BF16_TOL = 2.0 ** -6  # of max |reference|; a bf16 ulp is 2^-7 relative at worst
BF16_SLACK = 1.5  # ours vs f32 may be this much further than HF bf16 vs f32


def _wide(rng, rows: int, dim: int, lo: float = -4, hi: float = 3) -> np.ndarray:
    """Rows whose magnitudes span 10^lo .. 10^hi (tiny rows make the norm's eps matter)."""
    return rng.normal(size=(rows, dim)) * np.logspace(lo, hi, rows)[:, None]


def _bf16(x: np.ndarray) -> tuple[torch.Tensor, jax.Array]:
    t = torch.from_numpy(np.asarray(x, np.float32)).bfloat16()
    return t, jnp.asarray(t.float().numpy(), jnp.bfloat16)


def _f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy()
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def test_rms_norm_of_bf16_input_is_bit_identical_to_hf():
    rng = np.random.default_rng(0)
    hf = Qwen2RMSNorm(64, eps=1e-5).bfloat16()  # as in a bf16 HF model
    with torch.no_grad():
        hf.weight.copy_(torch.from_numpy(rng.normal(1, 0.3, 64)).bfloat16())
    ours = RMSNorm(64, 1e-5)
    ours.scale.set_value(jnp.asarray(_f32(hf.weight)))
    xt, xj = _bf16(_wide(rng, 96, 64))
    out = ours(xj)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_f32(out), _f32(hf(xt)))  # a bf16 normalisation differs in ~25%


def test_layer_norm_of_bf16_input_is_bit_identical_to_torch():
    rng = np.random.default_rng(1)
    ln = torch.nn.LayerNorm(64, eps=1e-4).bfloat16()
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(rng.normal(1, 0.3, 64)))
        ln.bias.copy_(torch.from_numpy(rng.normal(0, 0.3, 64)))
    ours = LayerNorm(64, 1e-4)
    ours.scale.set_value(jnp.asarray(_f32(ln.weight)))
    ours.bias.set_value(jnp.asarray(_f32(ln.bias)))
    x = _wide(rng, 96, 64) + rng.normal(size=(96, 1)) * np.logspace(-3, 3, 96)[:, None]  # offsets too
    xt, xj = _bf16(x)
    out = ours(xj)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_f32(out), _f32(ln(xt)))


def test_attention_softmax_of_bf16_inputs_is_float32():
    """bf16 q/k/v: scores and softmax in float32, probabilities rounded to bf16 once, as HF's eager
    attention does after its float32 softmax; a bf16 softmax differs in about half the outputs."""
    rng = np.random.default_rng(2)
    b, t, h = 2, 16, 16
    q = rng.normal(size=(b, t, 4, h)) * np.logspace(-2, 1.3, t)[None, :, None, None]  # wide score range
    (qt, qj), (kt, kj), (vt, vj) = (_bf16(x) for x in (q, rng.normal(size=(b, t, 2, h)), rng.normal(size=(b, t, 2, h))))
    seg = np.ones((b, t), np.int32)
    out = xla_attention(qj, kj, vj, make_mask(jnp.asarray(seg), causal=True, cross_segment=False), h ** -0.5)
    assert out.dtype == jnp.bfloat16
    heads = lambda x: x.float().permute(0, 2, 1, 3).repeat_interleave(4 // x.shape[2], 1)  # noqa: E731
    scores = heads(qt) @ heads(kt).transpose(-1, -2) * h ** -0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    ref = (torch.softmax(scores, -1).bfloat16().float() @ heads(vt)).bfloat16().permute(0, 2, 1, 3)
    np.testing.assert_array_equal(_f32(out), _f32(ref))


def test_token_loss_of_bf16_logits_is_float32():
    rng = np.random.default_rng(3)
    logits = _bf16(rng.normal(size=(2, 12, 128)) * 8)[1]
    ids = rng.integers(0, 128, (2, 12))
    mask, seg = np.ones((2, 12), np.int32), np.ones((2, 12), np.int32)
    total, count = token_losses(logits, jnp.asarray(ids), mask, seg, cross_segment=False)
    ref = F.cross_entropy(torch.from_numpy(_f32(logits)[:, :-1]).reshape(-1, 128),
                          torch.from_numpy(ids[:, 1:]).reshape(-1), reduction="sum")
    assert total.dtype == jnp.float32
    np.testing.assert_allclose(float(total.sum()), ref.item(), rtol=1e-6)


def _assert_bf16_close(ours, hf_bf16, hf_f32, what):
    scale = np.abs(hf_bf16).max()
    err, hf_err = np.abs(ours - hf_bf16).max(), np.abs(hf_bf16 - hf_f32).max()
    assert err <= BF16_TOL * scale, f"{what}: max |ours - HF bf16| = {err:.3g}, {err / scale:.3g} of max |ref|"
    ours_err = np.abs(ours - hf_f32).max()
    assert ours_err <= BF16_SLACK * hf_err, f"{what}: ours is {ours_err:.3g} from float32, HF bf16 {hf_err:.3g}"


@pytest.mark.parametrize("act", ["gelu", pytest.param("gelu_pytorch_tanh", marks=pytest.mark.slow)])
def test_siglip_in_bf16_matches_hf_in_bf16(act):
    hf = hf_siglip(act, layer_norm_eps=1e-5)
    rng = np.random.default_rng(4)
    images = rng.uniform(-1, 1, (3, 56, 56, 3)).astype(np.float32)
    images[1] *= 1e-2  # a nearly flat image next to full-range ones
    images[2, :28] *= 1e-3
    pix = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        f32 = hf(pixel_values=pix, output_hidden_states=True).hidden_states[-2].numpy()
        hf.to(torch.bfloat16)
        b16 = _f32(hf(pixel_values=pix.bfloat16(), output_hidden_states=True).hidden_states[-2])
    model = zeros_model(our_config(hf_vision=hf, vision_dtype="bfloat16", dtype="bfloat16"))
    load_hf(model, vision_tower=state_dict_np(hf))  # the bf16 weights, held exactly in float32
    out = nnx.jit(lambda m, x: m.vision_tower(x))(model, images)
    assert out.dtype == jnp.bfloat16
    _assert_bf16_close(_f32(out), b16, f32, "SigLIP features")


def test_qwen2_in_bf16_matches_hf_in_bf16():
    """Token embeddings scaled over four decades: some rows' mean square falls below rms_norm_eps."""
    hf = hf_qwen2(rms_norm_eps=1e-5)
    rng = np.random.default_rng(6)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb.mul_(torch.from_numpy(np.logspace(-2, 2, emb.shape[0])[rng.permutation(emb.shape[0])]).float()[:, None])
    ids = torch.from_numpy(rng.integers(0, emb.shape[0], (2, 24)))
    with torch.no_grad():
        f32 = hf(input_ids=ids).logits.numpy()
        hf.to(torch.bfloat16)
        b16 = _f32(hf(input_ids=ids).logits)
    model = zeros_model(our_config(hf_text=hf, dtype="bfloat16", vision_dtype="bfloat16"))
    load_hf(model, language_model=state_dict_np(hf))
    logits = nnx.jit(lambda m, x: m.language_model(x))(model, ids.numpy())
    _assert_bf16_close(np.asarray(logits), b16, f32, "Qwen2 logits")


@pytest.mark.slow
def test_vlm_in_bf16_matches_hf_in_bf16():
    """The whole model (tower, pooling, projector, decoder, logits) in bf16 on one sample with two
    images of very different ranges and token embeddings scaled over four decades."""
    ref = TorchVLM(70, 3, rms_norm_eps=1e-5)
    rng = np.random.default_rng(5)
    with torch.no_grad():  # embedding rows of 1e-2 .. 1e2 times their size
        emb = ref.llm.model.embed_tokens.weight
        emb.mul_(torch.from_numpy(np.logspace(-2, 2, emb.shape[0])[rng.permutation(emb.shape[0])]).float()[:, None])
    ids, _ = caption_sample(rng, 2, 12, 9)
    images = rng.uniform(-1, 1, (2, 70, 70, 3)).astype(np.float32)
    images[1] *= 1e-2
    with torch.no_grad():
        f32 = ref.logits(ids, images).numpy()
        for m in ref.modules():
            m.to(torch.bfloat16)
        ref.dtype = torch.bfloat16
        b16 = _f32(ref.logits(ids, images))
    model = ref.ours(dtype="bfloat16", vision_dtype="bfloat16")
    logits = nnx.jit(lambda m, *a: m(*a))(model, ids[None], images[None], np.arange(len(ids))[None],
                                          np.ones((1, len(ids)), np.int32))
    _assert_bf16_close(np.asarray(logits)[0], b16, f32, "VLM logits")


def test_chunked_lm_head_gradient_runs_bf16_gemms_and_equals_torch_bf16():
    """The chunked loss's LM head: float32 logits forward, and a backward pass whose gemms take the
    logits' gradient in bf16 (as torch's bf16 lm_head backward does), not float32 operands."""
    from oq2vl_jax.models.vlm import chunked_token_losses

    rng = np.random.default_rng(0)
    b, t, d, v = 2, 12, 16, 40
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.2, jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    ones = jnp.ones((b, t), jnp.int32)

    def loss(h, w):
        total, count = chunked_token_losses(h, w, ids, ones, ones, False, chunk=5)
        return jnp.sum(total) / jnp.sum(count)

    def dot_inputs(j):  # operand dtypes of every matmul, inside scans and checkpoints too
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                yield tuple(str(x.aval.dtype) for x in e.invars)
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from dot_inputs(inner)

    found = set(dot_inputs(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w).jaxpr))
    assert found == {("bfloat16", "bfloat16")}, found

    dh, dw = jax.grad(loss, argnums=(0, 1))(h, w)
    th = torch.tensor(np.asarray(h.astype(jnp.float32)), dtype=torch.bfloat16, requires_grad=True)
    tw = torch.tensor(np.asarray(w.astype(jnp.float32)), dtype=torch.bfloat16, requires_grad=True)
    logits = (th[:, :-1] @ tw).float()  # HF: bf16 lm_head, loss in float32
    F.cross_entropy(logits.reshape(-1, v), torch.tensor(np.asarray(ids[:, 1:])).reshape(-1).long()).backward()
    for ours, theirs in ((dh[:, :-1], th.grad[:, :-1]), (dw, tw.grad)):
        ref = theirs.float().numpy()
        np.testing.assert_allclose(np.asarray(ours.astype(jnp.float32)), ref, atol=BF16_TOL * np.abs(ref).max())
