"""Our checkpoint (converted or trained, any saving mesh) -> a directory `transformers` loads.

    python tools/convert/jax_to_hf.py --checkpoint runs/sft --out export/qwen2 --format qwen2
    python tools/convert/jax_to_hf.py --checkpoint runs/sft --step 5000 --out export/vlm --format llava
    python tools/convert/jax_to_hf.py --checkpoint runs/pretrain --out export/vlm --format pooled-llava

Formats:
  qwen2         the language model alone: Qwen2ForCausalLM (config.json, safetensors shards + index,
                tokenizer files, generation_config.json).
  llava         the VLM as stock LlavaForConditionalGeneration (AutoModelForImageTextToText, no remote
                code), plus an AutoProcessor (LlavaProcessor + SigLIP image processor) and a chat
                template. Only for identity pooling (image_tokens = the full patch grid, e.g. 729).
  pooled-llava  any pooling: the same Llava layout with model_type "pooled_llava" and two small code
                files that add the pooling step; load with trust_remote_code=True.
  prismatic     back to the original code: OUT/checkpoints/latest-checkpoint.pt = {"model":
                {"projector": mlp_projector.0/2.*, "llm_backbone": llm.<Qwen2 keys>}} in float32 with
                both embed_tokens and lm_head (docs/original_system.md §7), as the original saves a run with a
                frozen tower (no vision_backbone: it loads timm's). OUT/config.json holds only
                model.arch_specifier (e.g. "no-align+avgpool"); merge it into the run config the
                original's loader expects. hf_to_jax.py --oq-checkpoint reads both back.
  qwen2-vl      a model.arch qwen2_vl checkpoint as Qwen2VLForConditionalGeneration (transformers 5
                key layout), its tokenizer and chat template, and a Qwen2VLImageProcessor config with
                the model's min/max pixels. hf_to_jax.py --qwen2-vl reads it back.

Weights are written in the layouts every transformers version loads (the SigLIP tower under
`vision_tower.vision_model.`, the LM under `language_model.model.`; config.json carries rope_theta at
the top level as well as rope_parameters). The checkpoint is read on one CPU device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

from oq2vl_jax import checkpoint, failures, staging
from oq2vl_jax import cli
from oq2vl_jax.cli import UserError
from oq2vl_jax.hf_io import parse_size, write_safetensors
from oq2vl_jax.models import build_abstract, flat_params
from oq2vl_jax.models.config import ModelConfig
from oq2vl_jax.models.weights import LLM, PROJECTOR, VISION, WeightError, ours_to_hf, qwen2_vl_to_hf
from oq2vl_jax.treepaths import dotted

FORMATS = ("qwen2", "llava", "pooled-llava", "prismatic", "qwen2-vl")
REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pooled_llava")
REMOTE_CODE_FILES = ("configuration_pooled_llava.py", "modeling_pooled_llava.py")
# Qwen2.5's context; RoPE has no table, this only bounds generation defaults in transformers.
MAX_POSITION_EMBEDDINGS = 32768


class ExportError(UserError, ValueError):
    """The checkpoint cannot be written in the requested format; the message says why."""


# -- weights ---------------------------------------------------------------------------------------


def read_checkpoint(run_dir: str, model_cfg: ModelConfig, step: int | None):
    """(step, {our path: numpy}) as saved, checked against the parameter set the config defines."""
    step, nested = checkpoint.load_params_as_saved(run_dir, step)
    flat = {path: np.asarray(v) for path, v in checkpoint.flatten(nested).items()}
    want = flat_params(build_abstract(model_cfg)[1])
    missing = sorted(dotted(p) for p in want.keys() - flat.keys())
    extra = sorted(dotted(p) for p in flat.keys() - want.keys())
    if missing or extra:
        raise WeightError(f"{run_dir} step {step} does not match its config.yaml: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
    for path, value in flat.items():
        if tuple(value.shape) != tuple(want[path].shape):
            raise WeightError(f"{dotted(path)}: saved shape {value.shape} != {tuple(want[path].shape)} from config.yaml")
    return step, flat


def hf_state_dict(flat, fmt: str) -> dict[str, np.ndarray]:
    """HF keys (the legacy on-disk Llava layout for the VLM formats) -> arrays (possibly views)."""
    lm = ours_to_hf(LLM, flat)
    if fmt == "qwen2":
        return lm
    sd = {f"vision_tower.vision_model.{k}": v for k, v in ours_to_hf(VISION, flat).items()}
    sd.update({f"multi_modal_projector.{k}": v for k, v in ours_to_hf(PROJECTOR, flat).items()})
    sd.update({f"language_model.{k}": v for k, v in lm.items()})  # model.* and (untied) lm_head.weight
    return sd


def prismatic_state(flat) -> dict:
    """The original's checkpoint dict: float32 torch tensors, torch [out, in] layouts, tied head written."""
    import torch

    def tensors(sd, prefix):
        return {prefix + k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}

    lm = ours_to_hf(LLM, flat)
    lm.setdefault("lm_head.weight", lm["model.embed_tokens.weight"])  # a tied torch model saves both
    projector = {k.replace("linear_1.", "0.").replace("linear_2.", "2."): v
                 for k, v in ours_to_hf(PROJECTOR, flat).items()}
    return {"model": {"projector": tensors(projector, "mlp_projector."), "llm_backbone": tensors(lm, "llm.")}}


def arch_specifier(m: ModelConfig) -> str:
    """The original's name for the projector; its loader reads the token count from it."""
    return "no-align+avgpool" if m.image_tokens == 144 else f"full-align+{m.image_tokens}-avgpool"


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype.name == "bfloat16" else str(a.dtype)


# -- configs ---------------------------------------------------------------------------------------


def qwen2_config(m: ModelConfig, ids, dtype: str) -> dict:
    t = m.text
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS, "rms_norm_eps": t.rms_norm_eps,
        # v4 readers only know the top-level key (else they silently use 10000); v5 reads rope_parameters.
        "rope_theta": t.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": t.num_hidden_layers,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.pad,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if t.head_dim is not None:
        cfg["head_dim"] = t.head_dim
    return cfg


def siglip_config(m: ModelConfig) -> dict:
    v = m.vision
    return {
        "model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps, "attention_dropout": 0.0,
        "vision_use_head": False,
    }


def llava_config(m: ModelConfig, ids, dtype: str, pooled: bool) -> dict:
    cfg = {
        "architectures": ["PooledLlavaForConditionalGeneration" if pooled else "LlavaForConditionalGeneration"],
        "model_type": "pooled_llava" if pooled else "llava",
        "vision_config": siglip_config(m), "text_config": qwen2_config(m, ids, dtype),
        "image_token_index": m.image_token_id, "image_seq_length": m.image_tokens,
        "projector_hidden_act": m.projector_hidden_act,
        "vision_feature_select_strategy": "full",  # SigLIP has no CLS token to drop
        "vision_feature_layer": m.vision.feature_layer,  # both index HF hidden_states (pre post_layernorm)
        "multimodal_projector_bias": True, "tie_word_embeddings": m.text.tie_word_embeddings,
        "torch_dtype": dtype, "dtype": dtype,
    }
    del cfg["text_config"]["architectures"]
    if pooled:
        cfg["auto_map"] = {
            "AutoConfig": "configuration_pooled_llava.PooledLlavaConfig",
            "AutoModelForImageTextToText": "modeling_pooled_llava.PooledLlavaForConditionalGeneration",
        }
    return cfg


def generation_config(ids) -> dict:
    return {"bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.pad}


def processor_patch_size(image_size: int, side: int) -> int:
    """A `patch_size` for LlavaProcessor such that (image_size // patch_size)**2 = side**2 placeholders.

    image_size // side is the largest p with image_size // p >= side, and image_size // p only grows
    as p shrinks, so it is the only candidate."""
    p = image_size // side
    if image_size // p != side:
        raise ExportError(f"no processor patch size gives {side} image tokens per side at {image_size}px")
    return p


def chat_template(image_token: str) -> str:
    """ChatML (Qwen2.5's default system prompt) accepting string or [{type: image|text}] content;
    an image part becomes the processor's image token and a newline (the `<image>\\n` convention)."""
    return (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'image' %}{{- '" + image_token + "\\n' }}"
        "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def processor_files(m: ModelConfig, image_token: str) -> dict[str, dict]:
    """processor_config.json (v5, image processor nested) and preprocessor_config.json (older readers).

    The original's preprocessing: squash-resize to image_size, bicubic, [0, 1] then mean = std = 0.5.
    """
    size = m.vision.image_size
    image_processor = {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True,
        "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
    }
    processor = {
        "processor_class": "LlavaProcessor",
        # Not the tower's patch size: chosen so the processor writes image_tokens placeholders.
        "patch_size": processor_patch_size(size, m.pooled_side),
        "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0,
        "image_token": image_token,
    }
    return {"processor_config.json": {**processor, "image_processor": image_processor},
            "preprocessor_config.json": {**image_processor, "processor_class": "LlavaProcessor"}}


# -- export ----------------------------------------------------------------------------------------


def check_format(m: ModelConfig, fmt: str) -> None:
    if (fmt == "qwen2-vl") != (m.arch == "qwen2_vl") and fmt != "qwen2":
        raise ExportError(f"--format {fmt} cannot hold a model.arch {m.arch} checkpoint"
                          + (" (use --format qwen2-vl or qwen2)" if m.arch == "qwen2_vl" else ""))
    if fmt in ("qwen2", "qwen2-vl"):
        return
    if fmt == "prismatic":
        v = m.vision
        if v.feature_post_layernorm or v.num_layers_run() != v.num_hidden_layers - 1:
            raise ExportError("--format prismatic: the original takes the second-to-last block's output without "
                              f"post_layernorm; this model uses feature_layer={v.feature_layer}")
        if m.projector_hidden_act != "gelu":
            raise ExportError(f"--format prismatic: the original's projector uses exact GELU, this model "
                              f"{m.projector_hidden_act!r}")
        return
    if m.vision.feature_post_layernorm:
        raise ExportError("vision.feature_post_layernorm=true cannot be expressed by Llava, which selects "
                          "hidden states before post_layernorm")
    if fmt == "llava" and m.image_tokens != m.vision.num_patches:
        raise ExportError(f"--format llava needs identity pooling (image_tokens = {m.vision.num_patches}), but "
                          f"this model pools to {m.image_tokens} tokens; use --format pooled-llava")


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_prismatic(out: str, m: ModelConfig, flat) -> str:
    import torch

    if m.vision.hidden_act != "gelu":
        print(f"jax_to_hf: note: this model's tower uses {m.vision.hidden_act!r}; the original runs timm's "
              "tower with exact GELU", file=sys.stderr)
    state = prismatic_state(flat)
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    path = os.path.join(out, "checkpoints", "latest-checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written latest-checkpoint.pt
    _write_json(os.path.join(out, "config.json"), {"model": {"arch_specifier": arch_specifier(m)}})
    return out


def _cast(flat, dtype: str | None):
    if not dtype:
        return flat
    import ml_dtypes

    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    return {k: v.astype(target, copy=False) for k, v in flat.items()}


def export_qwen2_vl(args, cfg, tokenizer_dir: str) -> str:
    """--format qwen2-vl: the whole model as transformers' Qwen2VLForConditionalGeneration."""
    import qwen2_vl_hf

    from oq2vl_jax.data.qwen2_vl_text import CHAT_TEMPLATE, load_qwen2_vl_tokenizer, qwen2_vl_ids

    m = cfg.model
    tokenizer = load_qwen2_vl_tokenizer(tokenizer_dir)
    ids = qwen2_vl_ids(tokenizer)
    if (ids.image, ids.vision_start, ids.vision_end) != (m.image_token_id, m.vision_start_token_id,
                                                          m.vision_end_token_id):
        raise ExportError(f"the tokenizer's image/vision_start/vision_end ids {ids.image}/{ids.vision_start}/"
                          f"{ids.vision_end} differ from the model's {m.image_token_id}/{m.vision_start_token_id}/"
                          f"{m.vision_end_token_id}")
    step, flat = read_checkpoint(args.checkpoint, m, args.step)
    flat = _cast(flat, args.dtype)
    sd = qwen2_vl_to_hf(flat)
    dtype = _dtype_name(flat[(LLM, "model", "embed_tokens", "embedding")])
    files = {"config.json": qwen2_vl_hf.hf_config(m, ids, dtype), **qwen2_vl_hf.processor_files(m),
             "generation_config.json": {"bos_token_id": None, "eos_token_id": ids.im_end, "pad_token_id": ids.pad}}
    # Built in a folder beside --out and swapped in whole, as the other formats.
    with failures.writing(args.out), staging.staged_dir(args.out, args.overwrite, "an export") as out:
        write_safetensors(sd, out, parse_size(args.max_shard_size))
        del sd, flat
        tokenizer.save_pretrained(out)
        for name, obj in files.items():
            _write_json(os.path.join(out, name), obj)
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:  # shared by tokenizer and processor
            f.write(tokenizer.chat_template or CHAT_TEMPLATE)
    return os.path.abspath(args.out)


def export(args) -> str:
    from oq2vl_jax.data.tokenizer import IMAGE_PAD, load_tokenizer, special_ids

    staging.check_target(args.out, args.overwrite)  # before the checkpoint is read
    cfg = checkpoint.resolve_checkpoint_config(args.checkpoint)
    m = cfg.model
    check_format(m, args.format)
    tokenizer_dir = args.tokenizer or cfg.tokenizer
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        raise ExportError(f"tokenizer directory {tokenizer_dir!r} not found (set `tokenizer` in the checkpoint's "
                          "config.yaml or pass --tokenizer)")
    if args.format == "qwen2-vl":
        return export_qwen2_vl(args, cfg, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)  # prepared as in training: <s> as bos, <|endofchunk|>, image pad
    ids = special_ids(tokenizer)
    if ids.image != m.image_token_id and args.format != "qwen2":
        raise ExportError(f"the tokenizer's {IMAGE_PAD} is id {ids.image} but the model's image_token_id is "
                          f"{m.image_token_id}")

    # Every file's content is built (and can fail) before the first is written: no half-written
    # export. The processor first, as it needs no weights (e.g. a grid the processor cannot express).
    processor = {} if args.format in ("qwen2", "prismatic") else processor_files(m, IMAGE_PAD)
    step, flat = read_checkpoint(args.checkpoint, m, args.step)
    # Built in a folder beside --out and swapped in whole: never mixed with an earlier export.
    with failures.writing(args.out), staging.staged_dir(args.out, args.overwrite, "an export") as tmp:
        _write(args, tmp, m, flat, tokenizer, ids, processor)
    return os.path.abspath(args.out)


def _write(args, out: str, m: ModelConfig, flat, tokenizer, ids, processor: dict) -> None:
    from oq2vl_jax.data.tokenizer import IMAGE_PAD

    if args.format == "prismatic":
        write_prismatic(out, m, flat)
        return
    if args.dtype:
        import ml_dtypes

        target = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
        flat = {k: v.astype(target, copy=False) for k, v in flat.items()}
    sd = hf_state_dict(flat, args.format)
    dtype = _dtype_name(flat[(LLM, "model", "embed_tokens", "embedding")])
    pooled = args.format == "pooled-llava"
    config = qwen2_config(m, ids, dtype) if args.format == "qwen2" else llava_config(m, ids, dtype, pooled)
    files = {"generation_config.json": generation_config(ids), "config.json": config, **processor}

    write_safetensors(sd, out, parse_size(args.max_shard_size))
    del sd, flat
    # The prepared tokenizer, not the raw files: a run's `tokenizer` may be a stock one whose `<s>`
    # is not yet a special token, and HF users must tokenize prompts as training did.
    tokenizer.save_pretrained(out)
    for name, obj in files.items():
        _write_json(os.path.join(out, name), obj)
    if args.format == "qwen2":
        return
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:  # shared by tokenizer and processor
        f.write(chat_template(IMAGE_PAD))
    if pooled:
        for name in REMOTE_CODE_FILES:
            shutil.copy2(os.path.join(REMOTE_CODE_DIR, name), os.path.join(out, name))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our checkpoint directory (config.yaml + checkpoints/)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--out", required=True, help="output directory (built beside it, then swapped in)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (its old files go)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast the weights (default: as saved)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint config's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging("INFO")
    start = time.time()
    try:
        out = export(args)
    except (ValueError, FileNotFoundError, UserError) as e:  # ExportError, WeightError, ConfigError, lock, disk
        print(f"jax_to_hf: error: {cli.one_line(e)}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    print(f"jax_to_hf: wrote {args.format} to {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
