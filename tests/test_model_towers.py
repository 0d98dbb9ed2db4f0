"""The SigLIP tower and the Qwen2 decoder against HF torch at float32."""

import numpy as np
import pytest
import torch

from hf_tiny import hf_qwen2, hf_siglip, our_config, state_dict_np
from oq2vl_jax.models import build, load_hf
from oq2vl_jax.models.weights import timm_to_hf_siglip
from oq2vl_jax.models.vlm import token_losses

TOL = 1e-4


def _images(n=2, size=56, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _hf_hidden_states(hf, images):
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    return out


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_siglip_matches_hf(act, feature_layer):
    hf = hf_siglip(act)
    images = _images()
    ref = _hf_hidden_states(hf, images).hidden_states[feature_layer].numpy()
    cfg = our_config(hf_vision=hf)
    cfg = cfg.__class__(**{**cfg.__dict__, "vision": cfg.vision.__class__(**{**cfg.vision.__dict__, "feature_layer": feature_layer})})
    model = build(cfg)
    load_hf(model, vision_tower=state_dict_np(hf))
    ours = np.asarray(model.vision_tower(images))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_siglip_post_layernorm_equals_last_hidden_state():
    hf = hf_siglip()
    images = _images()
    ref = _hf_hidden_states(hf, images).last_hidden_state.numpy()
    base = our_config(hf_vision=hf)
    vision = base.vision.__class__(**{**base.vision.__dict__, "feature_layer": -1, "feature_post_layernorm": True})
    model = build(base.__class__(**{**base.__dict__, "vision": vision}))
    load_hf(model, vision_tower=state_dict_np(hf))
    np.testing.assert_allclose(np.asarray(model.vision_tower(images)), ref, atol=TOL, rtol=0)


def test_siglip_accepts_prefixed_and_timm_layouts():
    hf = hf_siglip("gelu")
    sd = state_dict_np(hf)
    images = _images()
    ref = _hf_hidden_states(hf, images).hidden_states[-2].numpy()
    # timm layout: fused qkv = [q; k; v], pos_embed [1, N, D], norm = post_layernorm.
    timm = {"pos_embed": sd["embeddings.position_embedding.weight"][None],
            "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
            "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
            "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"],
            "attn_pool.latent": np.zeros((1, 1, 32), np.float32)}
    for i in range(3):
        p = f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            timm[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
                [sd[f"{p}self_attn.{n}_proj.{leaf}"] for n in "qkv"], axis=0)
            timm[f"blocks.{i}.attn.proj.{leaf}"] = sd[f"{p}self_attn.out_proj.{leaf}"]
            for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                timm[f"blocks.{i}.{a}.{leaf}"] = sd[f"{p}{b}.{leaf}"]
    assert set(timm_to_hf_siglip(timm)) == set(sd)
    for layout in ({"vision_model." + k: v for k, v in sd.items()}, timm):
        model = build(our_config(hf_vision=hf))
        load_hf(model, vision_tower=layout)
        np.testing.assert_allclose(np.asarray(model.vision_tower(images)), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_qwen2_matches_hf(tie, kv_heads):
    hf = hf_qwen2(tie=tie, kv_heads=kv_heads)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 128, (2, 24))
    labels = ids.copy()
    labels[:, :5] = -100  # a masked prompt
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels))
    model = build(our_config(hf_text=hf))
    load_hf(model, language_model=state_dict_np(hf))
    logits = np.asarray(model.language_model(ids))
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=TOL, rtol=0)
    seg = np.ones_like(ids)
    total, count = token_losses(logits, ids, (labels != -100).astype(np.int32), seg, cross_segment=False)
    np.testing.assert_allclose(float(total.sum() / count.sum()), out.loss.item(), atol=1e-5, rtol=0)


def test_weight_errors_name_the_tensor():
    from oq2vl_jax.models.weights import WeightError

    hf = hf_qwen2()
    sd = state_dict_np(hf)
    model = build(our_config(hf_text=hf))
    bad = dict(sd, **{"model.layers.1.mlp.up_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(WeightError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(model, language_model=bad)
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(WeightError, match="model.norm.scale"):
        load_hf(model, language_model=missing)
    with pytest.raises(WeightError, match="model.extra.weight"):
        load_hf(model, language_model=dict(sd, **{"model.extra.weight": np.zeros(2)}))
