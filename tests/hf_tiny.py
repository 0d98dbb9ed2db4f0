"""Tiny random-weight HF torch models (built in-process, offline) and their matching configs of ours."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from oq2vl_jax.models import ModelConfig, TextConfig, VisionConfig

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              patch_size=14, image_size=56, layer_norm_eps=1e-6)
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6)
IMAGE_TOKEN_ID = 100
# Variants that differ from our config defaults in every numeric field HF configs carry (eps, rope
# theta, head_dim, channels, kv heads, ...), so that a field which silently falls back to our default
# shows up. The eps values are large enough to matter at HF's init scale (activations ~0.02).
VISION_VARIANT = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                      num_channels=4, patch_size=9, image_size=45, layer_norm_eps=1e-3)
TEXT_VARIANT = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=3, head_dim=16, rms_norm_eps=1e-4,
                    rope_theta=500.0)


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}


def hf_siglip(act: str = "gelu_pytorch_tanh", seed: int = 0, **overrides) -> SiglipVisionModel:
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(**{**VISION, **overrides}, hidden_act=act, vision_use_head=False)
    return SiglipVisionModel(cfg).eval()


def hf_qwen2(tie: bool = True, kv_heads: int = 2, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TEXT, "num_key_value_heads": kv_heads, **overrides}, tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def our_config(hf_vision=None, hf_text=None, image_tokens: int = 4, **overrides) -> ModelConfig:
    """Our ModelConfig (float32 everywhere) mirroring the given HF configs."""
    v = hf_vision.config if hf_vision is not None else SiglipVisionConfig(**VISION)
    t = hf_text.config if hf_text is not None else Qwen2Config(**TEXT)
    vision = VisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, num_channels=v.num_channels, image_size=v.image_size,
        patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
    )
    text = TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        head_dim=None if getattr(t, "head_dim", None) in (None, t.hidden_size // t.num_attention_heads) else t.head_dim,
        rope_theta=t.rope_parameters["rope_theta"], tie_word_embeddings=t.tie_word_embeddings,
    )
    kw = dict(vision=vision, text=text, image_tokens=image_tokens, image_token_id=IMAGE_TOKEN_ID,
              dtype="float32", param_dtype="float32", vision_dtype="float32", remat="none")
    kw.update(overrides)
    return ModelConfig(**kw)


# Qwen2-VL: a 2-block tower (head_dim 8) and a 2-layer decoder (head_dim 8: mrope_section sums to 4).
QWEN2_VL_VISION = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VL_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                     bos_token_id=1, eos_token_id=99, pad_token_id=0)
QWEN2_VL_IDS = dict(image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=101, vision_end_token_id=102)


def hf_qwen2_vl(tie: bool = False, seed: int = 0, vocab_size: int = 128, ids: dict | None = None):
    """ids: image/vision_start/vision_end token ids (default QWEN2_VL_IDS; a tokenizer's for converters)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    ids = ids or QWEN2_VL_IDS
    cfg = Qwen2VLConfig(vision_config=QWEN2_VL_VISION, text_config={**QWEN2_VL_TEXT, "vocab_size": vocab_size},
                        tie_word_embeddings=tie, video_token_id=max(ids.values()) + 1, **ids)
    cfg._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF inits biases (and LayerNorms) plainly; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
            elif "norm" in name or "ln_q" in name:
                p.normal_(1, 0.3)
    return model


def our_qwen2_vl_config(hf, **overrides) -> ModelConfig:
    """Our float32 ModelConfig (arch qwen2_vl) mirroring a HF Qwen2VLForConditionalGeneration."""
    from oq2vl_jax.models import Qwen2VLVisionConfig

    v, t = hf.config.vision_config, hf.config.text_config
    vision = Qwen2VLVisionConfig(
        depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, mlp_ratio=v.mlp_ratio,
        num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
        rope_theta=v.rope_parameters["rope_theta"],
    )
    text = TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_parameters["rope_theta"], tie_word_embeddings=hf.config.tie_word_embeddings,
        mrope_section=tuple(t.rope_parameters["mrope_section"]),
    )
    kw = dict(arch="qwen2_vl", qwen2_vl_vision=vision, text=text, dtype="float32", param_dtype="float32",
              vision_dtype="float32", remat="none", **QWEN2_VL_IDS)
    kw.update(overrides)
    return ModelConfig(**kw)
