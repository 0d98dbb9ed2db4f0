"""Qwen2-VL's HF side for the converters: config.json <-> our ModelConfig, processor files.

HF Qwen2VLForConditionalGeneration keeps the vision tower (with its merger) under `model.visual.`
and the decoder under `model.language_model.` (hub checkpoints from before transformers 5: `visual.`
and `model.`); both read, transformers 5's written. The image processor's min/max pixels come from
preprocessor_config.json when the directory has one.
"""

from __future__ import annotations

import json
import os

from oq2vl_jax.cli import UserError
from oq2vl_jax.models import ModelConfig, Qwen2VLVisionConfig, TextConfig

MAX_POSITION_EMBEDDINGS = 32768
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class Qwen2VLConfigError(UserError, ValueError):
    """A Qwen2-VL directory or checkpoint this converter cannot express; the message says why."""


def _pixels(directory: str) -> dict:
    """min_pixels / max_pixels of DIR/preprocessor_config.json (either spelling), if any."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        pre = json.load(f)
    size = pre.get("size") or {}
    out = {"min_pixels": pre.get("min_pixels", size.get("shortest_edge", size.get("min_pixels"))),
           "max_pixels": pre.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))}
    return {k: int(v) for k, v in out.items() if v is not None}


def read_config(directory: str) -> ModelConfig:
    """Our ModelConfig (arch qwen2_vl, default dtypes) from a HF Qwen2-VL directory."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise Qwen2VLConfigError(f"--qwen2-vl {directory!r}: not a HF model directory (no config.json)")
    hf = AutoConfig.from_pretrained(directory)
    if hf.model_type != "qwen2_vl":
        raise Qwen2VLConfigError(f"{directory}: model_type {hf.model_type!r} is not qwen2_vl")
    v, t = hf.vision_config, hf.text_config
    rope = dict(t.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise Qwen2VLConfigError(f"{directory}: rope_type {rope['rope_type']!r} is not supported (only M-RoPE)")
    if getattr(t, "use_sliding_window", False):
        raise Qwen2VLConfigError(f"{directory}: use_sliding_window=true is not supported")
    if v.hidden_act != "quick_gelu" or t.hidden_act != "silu":
        raise Qwen2VLConfigError(f"{directory}: activations {v.hidden_act!r}/{t.hidden_act!r} are not "
                                 "quick_gelu/silu")
    vision = Qwen2VLVisionConfig(
        depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, mlp_ratio=int(v.mlp_ratio),
        num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
        rope_theta=float((v.rope_parameters or {}).get("rope_theta", 10000.0)), **_pixels(directory),
    )
    text = TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]), tie_word_embeddings=hf.tie_word_embeddings,
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
    )
    return ModelConfig(arch="qwen2_vl", qwen2_vl_vision=vision, text=text, image_token_id=hf.image_token_id,
                       vision_start_token_id=hf.vision_start_token_id, vision_end_token_id=hf.vision_end_token_id)


def hf_config(m: ModelConfig, ids, dtype: str) -> dict:
    """config.json of a transformers Qwen2VLForConditionalGeneration (text fields also at the top
    level, as the hub configs that transformers 4 reads have them)."""
    v, t = m.qwen2_vl_vision, m.text
    rope = {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)}
    text = {
        "model_type": "qwen2_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": MAX_POSITION_EMBEDDINGS, "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": rope, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": t.num_hidden_layers, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": None, "eos_token_id": ids.im_end, "pad_token_id": ids.pad,
        "dtype": dtype,
    }
    vision = {
        "model_type": "qwen2_vl_vision", "depth": v.depth, "embed_dim": v.embed_dim, "hidden_size": v.hidden_size,
        "hidden_act": v.hidden_act, "mlp_ratio": v.mlp_ratio, "num_heads": v.num_heads,
        "in_channels": v.in_channels, "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size, "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    legacy = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                   "max_position_embeddings", "hidden_act")}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "text_config": text, "vision_config": vision, **legacy,
        "rope_theta": t.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "image_token_id": m.image_token_id,  # video_token_id: HF's default (videos are not modelled)
        "vision_start_token_id": m.vision_start_token_id, "vision_end_token_id": m.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": dtype, "dtype": dtype,
    }


def processor_files(m: ModelConfig) -> dict[str, dict]:
    """preprocessor_config.json for Qwen2VLImageProcessor with this model's resize bounds."""
    v = m.qwen2_vl_vision
    image = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
        "size": {"shortest_edge": v.min_pixels, "longest_edge": v.max_pixels},
        "min_pixels": v.min_pixels, "max_pixels": v.max_pixels, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size, "processor_class": "Qwen2VLProcessor",
    }
    return {"preprocessor_config.json": image}
