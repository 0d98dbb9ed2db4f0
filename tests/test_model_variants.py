"""Towers built from HF configs that differ from our defaults in every numeric field, against HF torch
at float32 (relative tolerances: these outputs are small, where an absolute 1e-4 would be loose),
and the converter reading each of those fields from a saved HF directory."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import torch
from flax import nnx
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from hf_tiny import TEXT_VARIANT, VISION_VARIANT, our_config, state_dict_np
from oq2vl_jax.models import TextConfig, VisionConfig, load_hf
from oq2vl_jax.models.vlm import token_losses
from torch_vlm import zeros_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "convert"))
import hf_to_jax  # noqa: E402

RTOL = 1e-4  # and an absolute floor of 1e-6 of the output's largest magnitude, for values near zero
# Fields of ours that have no HF config counterpart (they select features, not architecture).
NOT_FROM_HF = {"feature_layer"}


def _hf_vision(seed=0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**VISION_VARIANT, hidden_act="gelu", vision_use_head=False))
    with torch.no_grad():  # HF inits norms to (1, 0); make their parameters matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _hf_text(seed=0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TEXT_VARIANT, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _assert_close(ours, ref, what):
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=1e-6 * np.abs(ref).max(), err_msg=what)


def test_variant_configs_differ_from_our_defaults_in_every_numeric_field():
    cfg = our_config(hf_vision=_hf_vision(), hf_text=_hf_text())
    for ours, default in ((cfg.vision, VisionConfig()), (cfg.text, TextConfig())):
        for f in dataclasses.fields(ours):
            value = getattr(ours, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name not in NOT_FROM_HF:
                assert value != getattr(default, f.name), f"{type(ours).__name__}.{f.name} equals our default"
    assert cfg.text.head_dim is not None and cfg.text.head_dim != cfg.text.hidden_size // cfg.text.num_attention_heads


def test_siglip_variant_matches_hf():
    hf = _hf_vision()
    images = np.random.default_rng(0).uniform(-1, 1, (2, 45, 45, 4)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    model = zeros_model(our_config(hf_vision=hf, image_tokens=1))
    load_hf(model, vision_tower=state_dict_np(hf))
    out = nnx.jit(lambda m, x: m.vision_tower(x))(model, images)
    _assert_close(np.asarray(out), ref.hidden_states[-2].numpy(), "SigLIP features")


def test_qwen2_variant_matches_hf():
    hf = _hf_text()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TEXT_VARIANT["vocab_size"], (2, 40))  # long enough for rope_theta to matter
    labels = ids.copy()
    labels[:, :7] = -100
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels))
    model = zeros_model(our_config(hf_text=hf))
    load_hf(model, language_model=state_dict_np(hf))
    logits = np.asarray(nnx.jit(lambda m, x: m.language_model(x))(model, ids))
    _assert_close(logits, out.logits.numpy(), "Qwen2 logits")
    total, count = token_losses(logits, ids, (labels != -100).astype(np.int32), np.ones_like(ids), cross_segment=False)
    np.testing.assert_allclose(float(total.sum() / count.sum()), out.loss.item(), rtol=1e-5)


def test_converter_reads_every_variant_field(tmp_path):
    vision, text = _hf_vision(), _hf_text()
    vision.save_pretrained(tmp_path / "vision")
    text.save_pretrained(tmp_path / "llm")
    want = our_config(hf_vision=vision, hf_text=text)
    assert hf_to_jax.read_vision(str(tmp_path / "vision"))[0] == want.vision
    assert hf_to_jax.read_llm_config(str(tmp_path / "llm")) == want.text
