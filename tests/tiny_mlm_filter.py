"""A tiny random MLM-Filter in its released layout (a LLaVA-Unified `llava_qwen` directory plus the
HF SigLIP tower it names), and the same weights as a transformers LlavaForConditionalGeneration.

The LM head is untied and its digit rows are scaled up, so greedy decoding emits digits that depend
on the image and caption: parsed scores vary between samples instead of all being None.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

from hf_tiny import hf_qwen2, hf_siglip
from oq2vl_jax.data import mlm_filter
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer

IMAGE_SIZE = 70  # 5x5 patches of 14: 25 image tokens, or 3x3 pooled (torch's overlapping bins)
VOCAB = 1100
DIGIT_GAIN = 4.0


def build_tokenizer(out_dir: str) -> str:
    texts = [mlm_filter.render_prompt(c, m) for m in mlm_filter.METRICS
             for c in ("a red bus on a street", "0123456789 photo of a cat")] * 3
    build_tiny_tokenizer(texts, out_dir, vocab_size=1000)
    return out_dir


# LLaVA-Unified projector types: (select layer, image tokens, tensor prefix). aapool_mlp (average pool
# to mm_num_image_tokens, then the MLP) is what the authors' training script for this model sets.
PROJECTORS = {"aapool_mlp": (-1, 9, "model.mm_projector.mlp_projector."),
              "mlp2x_gelu": (-2, 25, "model.mm_projector.")}


def build_release(root: str, tokenizer_dir: str, seed: int = 0, projector_type: str = "aapool_mlp"):
    """Writes ROOT/siglip (HF SiglipVisionModel) and ROOT/mlm-filter (llava_qwen). Returns their
    paths and the torch modules {'vision', 'llm', 'projector'}."""
    layer, tokens, prefix = PROJECTORS[projector_type]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vision = hf_siglip(image_size=IMAGE_SIZE, seed=seed)
    llm = hf_qwen2(tie=False, vocab_size=VOCAB, seed=seed, initializer_range=0.2)
    torch.manual_seed(seed + 1)
    d_v, d_t = vision.config.hidden_size, llm.config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(d_v, d_t), torch.nn.GELU(), torch.nn.Linear(d_t, d_t))
    digits = [tok.convert_tokens_to_ids(str(i)) for i in range(10)]
    with torch.no_grad():
        llm.lm_head.weight[digits] *= DIGIT_GAIN

    vdir, ldir = os.path.join(root, "siglip"), os.path.join(root, "mlm-filter")
    vision.save_pretrained(vdir)
    os.makedirs(ldir, exist_ok=True)
    sd = {k: v.contiguous() for k, v in llm.state_dict().items()}
    sd.update({f"{prefix}{k}": v.contiguous() for k, v in projector.state_dict().items()})
    save_file(sd, os.path.join(ldir, "model.safetensors"), metadata={"format": "pt"})
    cfg = llm.config.to_dict()
    cfg.update(model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"], mm_projector_type=projector_type,
               mm_num_image_tokens=tokens, mm_vision_select_layer=layer, mm_vision_select_feature="patch",
               mm_use_im_start_end=False,
               mm_use_im_patch_token=False, mm_patch_merge_type="flat", mm_hidden_size=d_v,
               mm_vision_tower="google/siglip-so400m-patch14-384", image_aspect_ratio="pad",
               tokenizer_padding_side="right")
    with open(os.path.join(ldir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1, default=str)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), ldir)
    return vdir, ldir, {"vision": vision, "llm": llm, "projector": projector}


def hf_llava(modules: dict, image_token_id: int, projector_type: str = "aapool_mlp"):
    """transformers' Llava over the same torch weights (features of the same layer, exact-GELU MLP).
    For aapool_mlp its projector first average-pools the patch grid with torch's adaptive_avg_pool2d,
    as LLaVA-Unified's AvgPoolProjector does."""
    import math

    import torch.nn.functional as F
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    layer, tokens, _ = PROJECTORS[projector_type]
    vision, llm, projector = modules["vision"], modules["llm"], modules["projector"]
    cfg = LlavaConfig(vision_config=vision.config.to_dict(), text_config=llm.config.to_dict(),
                      image_token_index=image_token_id, projector_hidden_act="gelu", vision_feature_layer=layer,
                      vision_feature_select_strategy="full", multimodal_projector_bias=True,
                      image_seq_length=tokens, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    proj = model.model.multi_modal_projector
    proj.linear_1.load_state_dict(projector[0].state_dict())
    proj.linear_2.load_state_dict(projector[2].state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    if projector_type == "aapool_mlp":
        mlp, side = proj.forward, math.isqrt(tokens)

        def pooled(x):  # [n, g*g, c] -> [n, c, g, g] -> pool -> [n, side*side, c] -> MLP
            n, t, c = x.shape
            g = math.isqrt(t)
            x = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(n, c, g, g), (side, side))
            return mlp(x.flatten(2).transpose(1, 2))

        proj.forward = pooled
    return model


def random_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3), dtype=np.uint8)
            for _ in range(n)]
