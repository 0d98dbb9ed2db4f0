"""HF state dict <-> our parameters: the name table.

Our module attributes carry HF names, so a HF key maps to our path by (1) a per-tower prefix and
(2) the leaf rule `weight` -> `kernel` (Linear: transposed; Conv: OIHW -> HWIO) | `scale` (norms) |
`embedding` (Embed). timm SigLIP keys are first renamed to HF SiglipVisionModel keys (fused qkv split).

Arrays are numpy throughout; nothing here needs torch.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from oq2vl_jax.cli import UserError
from oq2vl_jax.treepaths import dotted, parse

# Our top-level component -> the HF model class whose state dict it holds.
VISION, PROJECTOR, LLM = "vision_tower", "multi_modal_projector", "language_model"
QWEN2_VL_VISION = "visual"  # Qwen2-VL's tower with its merger (HF `model.visual`)

# HF keys that are buffers or parts we don't model; skipped on import.
_IGNORED = {
    VISION: re.compile(r"^(head\.|text_model\.|logit_scale|logit_bias|.*position_ids$)"),
    LLM: re.compile(r"(rotary_emb\.inv_freq$)"),
    PROJECTOR: re.compile(r"$^"),
    QWEN2_VL_VISION: re.compile(r"$^"),
}


class WeightError(UserError, ValueError):
    """A missing, unexpected or mis-shaped tensor; the message names it."""


def normalize_vision_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accepts HF SiglipVisionModel / SiglipModel (with or without `vision_model.`) or timm
    ViT-SigLIP keys; returns unprefixed HF SiglipVisionModel keys (pooling head dropped)."""
    if any(k.startswith(("blocks.", "patch_embed.")) for k in sd):
        return timm_to_hf_siglip(sd)
    out = {}
    for k, v in sd.items():
        if k.startswith(("text_model.", "logit_")):
            continue
        k = k.removeprefix("vision_model.")
        if _IGNORED[VISION].match(k):
            continue
        out[k] = v
    return out


def timm_to_hf_siglip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm vit_*_siglip_* state dict -> HF SiglipVisionModel keys (attn_pool dropped)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("featurizer.").removeprefix("visual.trunk.")
        if k.startswith("attn_pool.") or k in ("fc_norm.weight", "fc_norm.bias"):
            continue
        if k == "pos_embed":
            out["embeddings.position_embedding.weight"] = np.asarray(v).reshape(-1, v.shape[-1])
            continue
        if k.startswith("patch_embed.proj."):
            out["embeddings.patch_embedding." + k.rsplit(".", 1)[1]] = v
            continue
        if k.startswith("norm."):
            out["post_layernorm." + k.rsplit(".", 1)[1]] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if not m:
            raise WeightError(f"unexpected timm SigLIP key {k!r}")
        i, rest = m.groups()
        pre = f"encoder.layers.{i}."
        if rest.startswith("attn.qkv."):
            leaf = rest.rsplit(".", 1)[1]
            v = np.asarray(v)
            if v.ndim not in (1, 2) or v.shape[0] % 3:
                raise WeightError(f"timm SigLIP tensor {k!r} has shape {v.shape}; a fused q;k;v needs 3*hidden rows")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(v, 3, axis=0)):
                out[f"{pre}self_attn.{name}.{leaf}"] = part
            continue
        rest = (rest.replace("norm1.", "layer_norm1.").replace("norm2.", "layer_norm2.")
                .replace("attn.proj.", "self_attn.out_proj."))
        out[pre + rest] = v
    return out


def _leaf_for(parent: tuple, hf_leaf: str, params: Mapping[tuple, np.ndarray]) -> str:
    if hf_leaf != "weight":
        return hf_leaf
    for leaf in ("kernel", "scale", "embedding"):
        if parent + (leaf,) in params:
            return leaf
    return "weight"


def _to_ours(value: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
    if leaf == "kernel" and ndim == 2:
        return value.T
    if leaf == "kernel" and ndim == 4:  # torch Conv2d OIHW -> flax HWIO
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and ndim == 5:  # torch Conv3d OITHW -> THWIO
        return value.transpose(2, 3, 4, 1, 0)
    return value


def _to_hf(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 5:
        return value.transpose(4, 3, 0, 1, 2)
    return value


def hf_to_ours(component: str, sd: Mapping[str, np.ndarray], params: Mapping[tuple, object],
               tie_word_embeddings: bool = True) -> dict[tuple, np.ndarray]:
    """Maps one component's HF state dict onto our flat parameter paths.

    `params` is our flat {path: array-or-shape} for the whole model; every parameter of the
    component must be provided exactly once and with the right shape, else WeightError names it.
    """
    if component == VISION:
        sd = normalize_vision_keys(sd)
    out: dict[tuple, np.ndarray] = {}
    for key, value in sd.items():
        if _IGNORED[component].search(key):
            continue
        if component == LLM and key == "lm_head.weight" and tie_word_embeddings:
            continue  # tied: HF keeps an alias of embed_tokens in memory
        hf_path = parse(key)
        leaf = _leaf_for((component,) + hf_path[:-1], hf_path[-1], params)
        path = (component,) + hf_path[:-1] + (leaf,)
        if path not in params:
            raise WeightError(f"unexpected tensor {key!r} for {component} (no parameter {dotted(path)})")
        hf_shape = tuple(np.shape(value))
        value = _to_ours(np.asarray(value), leaf, np.ndim(value))
        want = tuple(params[path].shape)
        if tuple(value.shape) != want:
            raise WeightError(f"tensor {key!r} has shape {hf_shape} (HF layout); "
                              f"{dotted(path)} needs {want} (ours)")
        out[path] = value
    missing = [p for p in params if p[0] == component and p not in out]
    if missing:
        names = ", ".join(dotted(p) for p in missing[:5])
        raise WeightError(f"{component}: {len(missing)} parameter(s) missing from the HF state dict, e.g. {names}")
    return out


def ours_to_hf(component: str, params: Mapping[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat parameters of one component -> HF state-dict keys (unprefixed, HF layouts)."""
    out = {}
    for path, value in params.items():
        if path[0] != component:
            continue
        leaf = path[-1]
        hf_leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
        out[dotted(path[1:-1] + (hf_leaf,))] = _to_hf(np.asarray(value), leaf)
    return out


def split_qwen2_vl(sd: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A Qwen2VLForConditionalGeneration state dict -> {"visual": tower keys, "language_model":
    Qwen2ForCausalLM keys}. Takes transformers 5's layout (`model.visual.`, `model.language_model.`)
    and the hub checkpoints' older one (`visual.`, `model.`)."""
    parts: dict[str, dict[str, np.ndarray]] = {QWEN2_VL_VISION: {}, LLM: {}}
    for k, v in sd.items():
        if k.startswith(("model.visual.", "visual.")):
            parts[QWEN2_VL_VISION][k.split("visual.", 1)[1]] = v
        elif k.startswith("model.language_model."):
            parts[LLM]["model." + k.removeprefix("model.language_model.")] = v
        elif k.startswith("model.") or k == "lm_head.weight":
            parts[LLM][k] = v
        else:
            raise WeightError(f"unexpected tensor {k!r} in a Qwen2-VL state dict")
    return parts


def qwen2_vl_to_hf(params: Mapping[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """Our Qwen2VL parameters -> a transformers 5 Qwen2VLForConditionalGeneration state dict."""
    out = {"model.visual." + k: v for k, v in ours_to_hf(QWEN2_VL_VISION, params).items()}
    for k, v in ours_to_hf(LLM, params).items():
        out[k if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")] = v
    return out
