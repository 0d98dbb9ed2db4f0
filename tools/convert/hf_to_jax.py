"""HF SigLIP (or timm) + HF Qwen2 (+ optionally an Open-Qwen2VL checkpoint) -> our checkpoint directory.

    python tools/convert/hf_to_jax.py --vision hf/siglip-so400m-patch14-384 \\
        --llm hf/Qwen2.5-1.5B-Instruct --image-tokens 144 --out checkpoints/oq2vl-base
    python tools/convert/hf_to_jax.py --vision hf/siglip-so400m-patch14-384 \\
        --llava hf/mlm-filter-qwen2.5-1.5b-gpt4o --out checkpoints/mlm-filter
    python tools/convert/hf_to_jax.py --vision hf/timm-ViT-SO400M-14-SigLIP-384/open_clip_pytorch_model.bin \\
        --llm hf/Qwen2.5-1.5B-Instruct --oq-checkpoint hf/Open-Qwen2VL/checkpoints/latest-checkpoint.pt \\
        --image-tokens 729 --out checkpoints/open-qwen2vl

    python tools/convert/hf_to_jax.py --siglip hf/siglip-so400m-patch14-384 --out checkpoints/siglip-pair
    python tools/convert/hf_to_jax.py --qwen2-vl hf/Qwen2-VL-2B-Instruct --out checkpoints/qwen2-vl-2b

(All paths are local directories/files; nothing is downloaded.)

--qwen2-vl: a HF Qwen2VLForConditionalGeneration directory (config, tokenizer, weights; its
preprocessor_config.json's min/max pixels when present) -> a model.arch qwen2_vl checkpoint, the
tokenizer kept as it ships. Takes the place of --vision/--llm.

Writes DIR/config.yaml (a full run Config whose model section comes from the HF configs, and
`tokenizer: tokenizer`, resolved against DIR by checkpoint.resolve_checkpoint_config), DIR/tokenizer
(the LLM's tokenizer prepared as Open-Qwen2VL does, see oq2vl_jax.data.tokenizer) and the weights as
DIR/checkpoints/0/params, the layout training starts from (`train.init_from`) and export reads.

--vision: a HF SiglipVisionModel / SiglipModel directory, a timm/open_clip ViT-SigLIP directory
(config.json with "architecture") or a single timm weights file (.safetensors / .bin). The tower keeps
its source's GELU: tanh for HF SigLIP, exact for timm. Open-Qwen2VL ran the timm tower, so to run HF
SigLIP weights as the original did pass --vision-act gelu (the default with --oq-checkpoint).
--llm: a HF Qwen2/Qwen2.5 directory (config, tokenizer; its weights unless --oq-checkpoint).
--llava: instead of --llm, a LLaVA(-Unified) Qwen2 checkpoint directory such as MLM-Filter's
mlm-filter-qwen2.5-1.5b-gpt4o (config with mm_* fields, model.* + lm_head + model.mm_projector.{0,2}.*
or model.mm_projector.mlp_projector.{0,2}.* tensors, tokenizer). --vision is then its mm_vision_tower
(HF siglip-so400m-patch14-384); features from mm_vision_select_layer; image tokens are every patch
(mlp2x_gelu) or mm_num_image_tokens after adaptive average pooling (aapool_mlp, e.g. 144); projector
GELU exact. The tokenizer is kept as released (not prepared as Open-Qwen2VL's), for
oq2vl_jax.data.curate --mlm-filter.
--siglip (alone): a HF SiglipModel with both towers -> the image/text pair that
oq2vl_jax.data.curate --siglip-score reads (siglip.json, model.safetensors, tokenizer/).
--oq-checkpoint: a prismatic `latest-checkpoint.pt` ({"model": {"projector", "llm_backbone"[,
"vision_backbone"]}}); its projector and LLM (and vision tower, if saved) replace the HF weights,
and the image token count comes from the run's config.json (RUN/config.json for
RUN/checkpoints/latest-checkpoint.pt) unless --image-tokens says it.
Without it the projector is initialised exactly as the original does (torch.manual_seed(1152), then
nn.Linear's default init).

Tensors are read lazily (safetensors memory maps, torch mmap) and keep their dtypes unless --dtype
is given; peak memory is about one copy of the weights plus 1 GB. Any missing, unexpected or
mis-shaped tensor stops the conversion with its name, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from oq2vl_jax import checkpoint, integrity
from oq2vl_jax import cli
from oq2vl_jax.cli import UserError
from oq2vl_jax.config import Config
from oq2vl_jax.hf_io import LazyTensors, read_model_dir, read_torch, read_weights_file, torch_tensors, torch_linear_init
from oq2vl_jax.models import ModelConfig, TextConfig, VisionConfig, build_abstract, flat_params
from oq2vl_jax.models.layers import dtype_of
from oq2vl_jax.models.weights import LLM, PROJECTOR, VISION, WeightError, hf_to_ours, split_qwen2_vl

VISION_ACTS = ("gelu", "gelu_pytorch_tanh")
DTYPES = ("float32", "bfloat16")
TIMM_WEIGHT_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                     "pytorch_model.bin")


class ConversionError(UserError, ValueError):
    """Bad inputs (wrong directory, unsupported config); the message says what and where."""


# -- vision ------------------------------------------------------------------------------------------


def _timm_trunk(tensors: LazyTensors) -> LazyTensors:
    """The timm ViT keys of a timm, open_clip (visual.trunk.*) or prismatic (featurizer.*) state dict."""
    for prefix in ("visual.trunk.", "featurizer."):
        if any(k.startswith(prefix) for k in tensors):
            return tensors.subset(prefix)
    return tensors


def _timm_vision_config(tensors: LazyTensors, heads: int | None, image_size: int | None) -> VisionConfig:
    """A timm ViT-SigLIP has no HF config: sizes come from tensor shapes, heads from so400m or --vision-heads."""
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.bias"):
        if key not in tensors:
            raise WeightError(f"{tensors.source}: timm SigLIP tensor {key!r} is missing")
    pos = tensors["pos_embed"]
    hidden, patches = pos.shape[-1], int(np.prod(pos.shape[:-1]))
    grid = int(round(patches**0.5))
    if grid * grid != patches:
        raise WeightError(f"{tensors.source}: pos_embed {pos.shape} is not a square patch grid")
    patch_w = tensors["patch_embed.proj.weight"].shape  # (hidden, channels, p, p)
    layers = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    if heads is None:
        if hidden != 1152:
            raise ConversionError(f"{tensors.source}: cannot infer the attention heads of a {hidden}-wide timm "
                                  "ViT; pass --vision-heads")
        heads = 16  # vit_so400m_patch14_siglip_*: head_dim 72
    if image_size is None:
        # 384 for so400m-384 (27 * 14 = 378 < 384: the VALID conv drops 6 pixels), else the exact grid.
        image_size = 384 if 384 // patch_w[-1] == grid else grid * patch_w[-1]
    return VisionConfig(
        hidden_size=hidden, intermediate_size=tensors["blocks.0.mlp.fc1.bias"].shape[0], num_hidden_layers=layers,
        num_attention_heads=heads, num_channels=patch_w[1], image_size=image_size, patch_size=patch_w[-1],
        layer_norm_eps=1e-6, hidden_act="gelu",  # timm's default nn.GELU is exact erf
    )


def _hf_vision_config(directory: str) -> VisionConfig:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(directory)
    if hf.model_type == "siglip":  # a full SiglipModel checkpoint
        hf = hf.vision_config
    if hf.model_type != "siglip_vision_model":
        raise ConversionError(f"{directory}: model_type {hf.model_type!r} is not a SigLIP vision model")
    if hf.hidden_act not in VISION_ACTS:
        raise ConversionError(f"{directory}: hidden_act {hf.hidden_act!r} is not one of {VISION_ACTS}")
    return VisionConfig(
        hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads, num_channels=hf.num_channels, image_size=hf.image_size,
        patch_size=hf.patch_size, layer_norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act,
    )


def read_vision(path: str, heads: int | None = None, image_size: int | None = None):
    """(VisionConfig, lazy tensors) of a HF SigLIP directory, a timm directory or a timm weights file."""
    if os.path.isfile(path):
        tensors = _timm_trunk(read_weights_file(path))
        return _timm_vision_config(tensors, heads, image_size), tensors
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ConversionError(f"--vision {path!r}: not a weights file nor a directory with config.json")
    with open(config) as f:
        raw = json.load(f)
    if "model_type" not in raw and "architecture" in raw:  # a timm hub directory
        for name in TIMM_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return read_vision(os.path.join(path, name), heads, image_size)
        raise ConversionError(f"{path}: timm directory without weights ({', '.join(TIMM_WEIGHT_FILES)})")
    return _hf_vision_config(path), read_model_dir(path)


# -- language model --------------------------------------------------------------------------------


def _rope_theta(hf) -> float:
    """rope_theta from a v5 (rope_parameters) or v4 (top-level) config; only default RoPE is modelled."""
    params = getattr(hf, "rope_parameters", None) or {}
    scaling = getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(f"rope_type {rope_type!r} is not supported (only default RoPE)")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise ConversionError("the LLM config has no rope_theta")
    return float(theta)


def read_llm_config(directory: str) -> TextConfig:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ConversionError(f"--llm {directory!r}: not a HF model directory (no config.json)")
    hf = AutoConfig.from_pretrained(directory)
    if hf.model_type != "qwen2":
        raise ConversionError(f"{directory}: model_type {hf.model_type!r} is not qwen2")
    return _text_config(hf, directory)


def _text_config(hf, directory: str) -> TextConfig:
    if getattr(hf, "use_sliding_window", False):
        raise ConversionError(f"{directory}: use_sliding_window=true is not supported")
    if hf.hidden_act != "silu":
        raise ConversionError(f"{directory}: hidden_act {hf.hidden_act!r} is not silu")
    head_dim = getattr(hf, "head_dim", None)
    return TextConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        head_dim=None if head_dim in (None, hf.hidden_size // hf.num_attention_heads) else head_dim,
        rms_norm_eps=hf.rms_norm_eps, rope_theta=_rope_theta(hf), tie_word_embeddings=hf.tie_word_embeddings,
    )


# -- Open-Qwen2VL (prismatic) checkpoint -----------------------------------------------------------

# prismatic's AvgPoolProjector.mlp_projector = Sequential(Linear, GELU, Linear) -> Llava's names.
_OQ_PROJECTOR = {"mlp_projector.0.": "linear_1.", "mlp_projector.2.": "linear_2."}


def read_oq_checkpoint(path: str) -> dict[str, LazyTensors]:
    """{component: lazy HF-named tensors} from a prismatic checkpoint (docs/original_system.md §7)."""
    obj = read_torch(path)
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or "projector" not in model or "llm_backbone" not in model:
        got = sorted(model) if isinstance(model, dict) else sorted(obj) if isinstance(obj, dict) else type(obj)
        raise WeightError(f"{path}: not a prismatic checkpoint (need model.projector and model.llm_backbone; "
                          f"found {got})")
    projector = {}
    for key, value in model["projector"].items():
        new = next((key.replace(a, b, 1) for a, b in _OQ_PROJECTOR.items() if key.startswith(a)), None)
        if new is None:
            raise WeightError(f"{path}: unexpected projector tensor {key!r} (expected mlp_projector.0/2.*)")
        projector[new] = value
    llm = {}
    for key, value in model["llm_backbone"].items():
        if not key.startswith("llm."):
            raise WeightError(f"{path}: unexpected llm_backbone tensor {key!r} (expected llm.*)")
        llm[key.removeprefix("llm.")] = value
    out = {PROJECTOR: torch_tensors(projector, f"{path}:projector"), LLM: torch_tensors(llm, f"{path}:llm_backbone")}
    if "vision_backbone" in model:
        out[VISION] = _timm_trunk(torch_tensors(model["vision_backbone"], f"{path}:vision_backbone"))
    return out


def oq_image_tokens(ckpt_path: str) -> int | None:
    """Image tokens of a prismatic run, from `model.arch_specifier` in the run's config.json
    (RUN/checkpoints/latest-checkpoint.pt → RUN/config.json); None when there is no config.
    As the original: "...+729-avgpool" → 729, "...+avgpool" → 144."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        arch = (json.load(f).get("model") or {}).get("arch_specifier")
    if arch is None:
        return None
    if not arch.endswith("avgpool"):
        raise ConversionError(f"{path}: arch_specifier {arch!r} is not an avgpool projector; only those convert")
    head = arch.split("+")[-1].split("-")[0]
    return int(head) if head.isdigit() else 144


# -- LLaVA-Qwen checkpoint (MLM-Filter) ------------------------------------------------------------

LLAVA_TYPES = ("llava_qwen",)


LLAVA_PROJECTORS = {  # mm_projector_type -> the prefix of its Linear-GELU-Linear tensors
    "mlp2x_gelu": "model.mm_projector.",  # nn.Sequential on every patch
    "aapool_mlp": "model.mm_projector.mlp_projector.",  # adaptive average pool to mm_num_image_tokens first
}


def read_llava(directory: str) -> tuple[TextConfig, dict, dict[str, LazyTensors]]:
    """(LLM config, LLaVA settings, {component: lazy HF-named tensors}) of a LLaVA(-Unified) Qwen2
    checkpoint directory, e.g. mlm-filter-qwen2.5-1.5b-gpt4o: a Qwen2 config with mm_* fields and one
    state dict with model.* (Qwen2 decoder), lm_head.weight and the projector's two Linear layers
    (LLAVA_PROJECTORS). Its SigLIP tower is loaded by name (mm_vision_tower) from its own release, so
    it comes from --vision; vision tensors saved in the checkpoint are not read, as the original does."""
    from transformers import Qwen2Config

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"--llava {directory!r}: not a HF model directory (no config.json)")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type") not in LLAVA_TYPES:
        raise ConversionError(f"{path}: model_type {raw.get('model_type')!r} is not one of {LLAVA_TYPES}")
    settings = {k: raw.get(k) for k in ("mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
                                        "mm_use_im_start_end", "mm_patch_merge_type", "mm_hidden_size",
                                        "mm_vision_tower", "mm_num_image_tokens")}
    for key, allowed in (("mm_projector_type", tuple(LLAVA_PROJECTORS)), ("mm_vision_select_feature", ("patch", None)),
                         ("mm_use_im_start_end", (False, None)), ("mm_patch_merge_type", ("flat", None))):
        if settings[key] not in allowed:
            raise ConversionError(f"{path}: {key}={settings[key]!r} is not supported (only {allowed})")
    if settings["mm_projector_type"] == "aapool_mlp" and not settings["mm_num_image_tokens"]:
        raise ConversionError(f"{path}: aapool_mlp without mm_num_image_tokens")
    text = {k: v for k, v in raw.items() if not k.startswith(("mm_", "_")) and k not in ("model_type", "architectures")}
    text_cfg = _text_config(Qwen2Config(**text), directory)
    sd = read_model_dir(directory)
    prefix = LLAVA_PROJECTORS[settings["mm_projector_type"]]
    names = {}  # our Llava-style projector name -> their key
    for key in (k for k in sd if k.startswith("model.mm_projector.")):
        index, _, leaf = key.removeprefix(prefix).partition(".") if key.startswith(prefix) else ("", "", "")
        if index not in ("0", "2"):
            raise WeightError(f"{directory}: unexpected projector tensor {key!r} (expected {prefix}0/2.*)")
        names[f"linear_{1 if index == '0' else 2}.{leaf}"] = key
    projector = LazyTensors(list(names), lambda k: sd[names[k]], f"{directory}:mm_projector")
    llm_keys = [k for k in sd if not k.startswith(("model.mm_projector.", "model.vision_tower.", "model.vision_resampler."))]
    llm = LazyTensors(llm_keys, sd.__getitem__, f"{directory}:llm")
    return text_cfg, settings, {PROJECTOR: projector, LLM: llm}


def load_llava_tokenizer(src: str):
    """The checkpoint's own tokenizer, unprepared (MLM-Filter prompts use its stock specials), plus
    <|image_pad|> when missing: that id marks image slots. Returns (tokenizer, image id)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from oq2vl_jax.data.tokenizer import IMAGE_PAD

    tok = AutoTokenizer.from_pretrained(src)
    image = tok.convert_tokens_to_ids(IMAGE_PAD)
    if image is None or image == tok.unk_token_id:
        tok.add_tokens([AddedToken(IMAGE_PAD, special=True, normalized=False)], special_tokens=True)
        image = tok.convert_tokens_to_ids(IMAGE_PAD)
    return tok, int(image)


# -- SigLIP image + text towers (for the curator's SigLIP score) -------------------------------------


def convert_siglip(src: str, out: str, dtype: str | None = None) -> str:
    """A HF SiglipModel directory (both towers) -> OUT/siglip.json, OUT/model.safetensors (our
    parameter names, the dtypes kept unless `dtype`), OUT/tokenizer. Read by data/siglip_score.py."""
    from flax import nnx
    from transformers import AutoConfig, AutoTokenizer

    from oq2vl_jax.data.siglip_score import CONFIG, TOKENIZER, WEIGHTS
    from oq2vl_jax.hf_io import write_safetensors
    from oq2vl_jax.models.siglip_text import SiglipPair, SiglipPairConfig, SiglipTextConfig, hf_to_pair

    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ConversionError(f"--siglip {src!r}: not a HF model directory (no config.json)")
    if os.path.exists(os.path.join(out, WEIGHTS)):
        raise ConversionError(f"--out {out!r} already holds {WEIGHTS}; use a new directory")
    hf = AutoConfig.from_pretrained(src)
    if hf.model_type != "siglip":
        raise ConversionError(f"{src}: model_type {hf.model_type!r} is not siglip (a SiglipModel with both towers)")
    v, t = hf.vision_config, hf.text_config
    for name, act in (("vision", v.hidden_act), ("text", t.hidden_act)):
        if act not in VISION_ACTS:
            raise ConversionError(f"{src}: {name} hidden_act {act!r} is not one of {VISION_ACTS}")
    vision = dataclasses.replace(_hf_vision_config(src), feature_layer=-1, feature_post_layernorm=True)
    text = SiglipTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                            max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                            hidden_act=t.hidden_act,
                            projection_size=getattr(t, "projection_size", None) or t.hidden_size)
    cfg = SiglipPairConfig(vision=vision, text=text)
    abstract = flat_params(nnx.eval_shape(lambda: SiglipPair(cfg, rngs=nnx.Rngs(0))))
    flat = hf_to_pair(read_model_dir(src), abstract)
    tensors = {}
    for path, value in flat.items():
        value = np.asarray(value)
        tensors[".".join(map(str, path))] = value.astype(dtype_of(dtype)) if dtype else value
    tok = AutoTokenizer.from_pretrained(src)
    os.makedirs(out, exist_ok=True)
    tok.save_pretrained(os.path.join(out, TOKENIZER))
    assert write_safetensors(tensors, out, max_shard_bytes=1 << 62) == [WEIGHTS]  # one file
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    return out


# -- conversion ------------------------------------------------------------------------------------


def original_projector(vision_dim: int, text_dim: int, seed: int) -> dict[str, np.ndarray]:
    """Open-Qwen2VL's fresh projector: torch.manual_seed(vision embed dim), then two default nn.Linear."""
    (w1, b1), (w2, b2) = torch_linear_init(seed, [(vision_dim, text_dim), (text_dim, text_dim)])
    return {"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}


def _check_tied_head(sd, source: str) -> None:
    """A tied model drops lm_head on import; refuse if the checkpoint's head is not the embedding."""
    if "lm_head.weight" in sd and "model.embed_tokens.weight" in sd:  # a missing embedding is named later
        head, embed = sd["lm_head.weight"], sd["model.embed_tokens.weight"]
        if head.shape != embed.shape or not np.array_equal(head, embed):
            raise WeightError(f"{source}: lm_head.weight differs from model.embed_tokens.weight but the "
                              "config ties them (tie_word_embeddings=true)")


def _to_device(value: np.ndarray, dtype: str | None) -> jax.Array:
    """One copy of a (memory-mapped, possibly transposed) tensor on the default device, cast if asked."""
    value = np.asarray(value)
    if dtype is not None and value.dtype != np.dtype(dtype_of(dtype)):
        value = value.astype(dtype_of(dtype))
    return jax.device_put(value)


def load_prepared_tokenizer(path: str):
    """(tokenizer, SpecialIds), prepared as the data pipeline does (adds <|image_pad|> if missing)."""
    from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(path)
    return tok, special_ids(tok)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision", help="HF SigLIP dir, timm dir or timm weights file")
    p.add_argument("--siglip", help="alone: convert a HF SiglipModel (image + text towers) for "
                   "oq2vl_jax.data.curate --siglip-score")
    p.add_argument("--llm", help="HF Qwen2 dir (config, tokenizer, weights); or use --llava")
    p.add_argument("--llava", help="a LLaVA(-Unified) Qwen2 checkpoint dir (e.g. mlm-filter-qwen2.5-1.5b-gpt4o): "
                   "LLM, projector and tokenizer; its SigLIP tower comes from --vision")
    p.add_argument("--qwen2-vl", help="HF Qwen2-VL dir (alone, instead of --vision/--llm)")
    p.add_argument("--oq-checkpoint", help="Open-Qwen2VL / prismatic latest-checkpoint.pt")
    p.add_argument("--image-tokens", type=int, help="image tokens after pooling (144, 729, ...; default: the "
                   "--oq-checkpoint run's arch_specifier, else 144)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not hold one already)")
    p.add_argument("--dtype", choices=DTYPES, help="cast all weights (default: keep each tensor's dtype)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --llm)")
    p.add_argument("--vision-feature-layer", type=int, default=-2,
                   help="HF hidden_states index of the image features (default -2, as the original)")
    p.add_argument("--vision-act", choices=VISION_ACTS, help="override the tower's GELU flavour (default: the "
                   "source's; exact gelu with --oq-checkpoint, which was trained on timm's tower)")
    p.add_argument("--vision-heads", type=int, help="attention heads of a timm tower that is not so400m")
    p.add_argument("--vision-image-size", type=int, help="input size of a timm tower (default 384 for 27x27/14)")
    p.add_argument("--projector-act", choices=VISION_ACTS, default="gelu", help="projector GELU (original: gelu)")
    p.add_argument("--projector-seed", type=int, help="seed of a fresh projector (default: vision hidden size)")
    args = p.parse_args(argv)
    if args.qwen2_vl is not None:
        if args.vision or args.llm or args.llava or args.oq_checkpoint or args.siglip:
            p.error("--qwen2-vl converts a Qwen2-VL alone (with --out, optionally --dtype/--tokenizer)")
        return args
    if args.siglip:
        if args.vision or args.llm or args.llava or args.oq_checkpoint:
            p.error("--siglip converts a SigLIP alone (with --out, optionally --dtype)")
        return args
    if args.vision is None:
        p.error("--vision is required")
    if (args.llm is None) == (args.llava is None):
        p.error("give exactly one of --llm and --llava")
    if args.llava and args.oq_checkpoint:
        p.error("--oq-checkpoint goes with --llm, not --llava")
    return args


def _save(out: str, model_cfg: ModelConfig, tok, flat: dict) -> None:
    """Tokenizer, config, then the weights (called once everything is validated)."""
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    checkpoint.save_config(out, Config(model=model_cfg, tokenizer="tokenizer"))
    # Orbax deep-copies numpy leaves and writes them all at once; jax arrays are written with a bound
    # on the bytes in flight, so the save adds ~1 GB to the one copy of the weights made above.
    mngr = checkpoint.make_manager(out, async_save=False, save_concurrent_gb=1)
    checkpoint.save(mngr, 0, params=checkpoint.nest(flat))
    mngr.wait_until_finished()
    mngr.close()
    integrity.write_manifest(os.path.join(checkpoint.checkpoint_dir(out), "0"))  # readers verify it


def convert_qwen2_vl(args, out: str) -> str:
    from qwen2_vl_hf import read_config

    from oq2vl_jax.data.qwen2_vl_text import load_qwen2_vl_tokenizer, qwen2_vl_ids

    model_cfg = read_config(args.qwen2_vl)
    tok = load_qwen2_vl_tokenizer(args.tokenizer or args.qwen2_vl)
    ids = qwen2_vl_ids(tok)
    if ids.vocab_len > model_cfg.text.vocab_size:
        raise ConversionError(f"the tokenizer has {ids.vocab_len} tokens but the LLM only "
                              f"{model_cfg.text.vocab_size} embedding rows")
    for name in ("image", "vision_start", "vision_end"):
        want = getattr(model_cfg, "image_token_id" if name == "image" else f"{name}_token_id")
        if getattr(ids, name) != want:
            raise ConversionError(f"the tokenizer's {name} token is id {getattr(ids, name)}, the config says {want}")
    abstract = flat_params(build_abstract(model_cfg)[1])
    tie = model_cfg.text.tie_word_embeddings
    parts = split_qwen2_vl(read_model_dir(args.qwen2_vl))
    if tie:
        _check_tied_head(parts[LLM], args.qwen2_vl)
    flat = {}
    for component, sd in parts.items():
        flat.update(hf_to_ours(component, sd, abstract, tie_word_embeddings=tie))
    _save(out, model_cfg, tok, {k: _to_device(v, args.dtype) for k, v in flat.items()})
    return out


def convert(args) -> str:
    """Runs the conversion described by parsed `args`; returns the output directory."""
    out = os.path.abspath(args.out)
    if getattr(args, "siglip", None):
        return convert_siglip(args.siglip, out, args.dtype)
    if os.path.isdir(checkpoint.checkpoint_dir(out)) and os.listdir(checkpoint.checkpoint_dir(out)):
        raise ConversionError(f"--out {out!r} already holds a checkpoint; use a new directory")
    for flag, path in (("--vision", args.vision), ("--llm", args.llm), ("--llava", args.llava),
                       ("--oq-checkpoint", args.oq_checkpoint), ("--qwen2-vl", args.qwen2_vl)):
        if path is not None and not os.path.exists(path):
            raise ConversionError(f"{flag} {path!r} does not exist")
    if args.qwen2_vl:
        return convert_qwen2_vl(args, out)

    vision_cfg, vision_sd = read_vision(args.vision, args.vision_heads, args.vision_image_size)
    # Open-Qwen2VL's projector and LLM were trained on timm's exact-GELU tower, whatever --vision is.
    act = args.vision_act or ("gelu" if args.oq_checkpoint else vision_cfg.hidden_act)
    vision_cfg = dataclasses.replace(vision_cfg, feature_layer=args.vision_feature_layer, hidden_act=act)
    if args.llava:
        return _convert_llava(args, out, vision_cfg, vision_sd)
    text_cfg = read_llm_config(args.llm)
    oq = read_oq_checkpoint(args.oq_checkpoint) if args.oq_checkpoint else {}
    image_tokens = args.image_tokens
    run_tokens = oq_image_tokens(args.oq_checkpoint) if args.oq_checkpoint else None
    if image_tokens is not None and run_tokens is not None and image_tokens != run_tokens:
        raise ConversionError(f"--image-tokens {image_tokens}, but the checkpoint's run config says {run_tokens}")
    image_tokens = image_tokens or run_tokens or 144
    if VISION in oq:
        vision_sd = oq[VISION]  # the checkpoint saved its (possibly trained) tower
    llm_sd = oq[LLM] if LLM in oq else read_model_dir(args.llm)
    if PROJECTOR in oq:
        projector_sd = oq[PROJECTOR]
    else:
        seed = vision_cfg.hidden_size if args.projector_seed is None else args.projector_seed
        projector_sd = original_projector(vision_cfg.hidden_size, text_cfg.hidden_size, seed)

    tok, ids = load_prepared_tokenizer(args.tokenizer or args.llm)
    if ids.vocab_len > text_cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {ids.vocab_len} tokens but the LLM only {text_cfg.vocab_size} "
                              "embedding rows")
    model_cfg = ModelConfig(vision=vision_cfg, text=text_cfg, image_tokens=image_tokens,
                            projector_hidden_act=args.projector_act, image_token_id=ids.image)

    return _write(out, args, model_cfg, tok, vision_sd, projector_sd, llm_sd)


def _convert_llava(args, out: str, vision_cfg: VisionConfig, vision_sd) -> str:
    """A LLaVA-Qwen checkpoint + its SigLIP tower: features from mm_vision_select_layer; image tokens
    = mm_num_image_tokens for aapool_mlp (torch's adaptive average pool, as our projector), else every
    patch; the projector's GELU is nn.GELU (exact)."""
    text_cfg, llava, comps = read_llava(args.llava)
    if llava["mm_vision_select_layer"] is not None:
        vision_cfg = dataclasses.replace(vision_cfg, feature_layer=int(llava["mm_vision_select_layer"]))
    if llava["mm_hidden_size"] not in (None, vision_cfg.hidden_size):
        raise ConversionError(f"{args.llava}: mm_hidden_size {llava['mm_hidden_size']} but the --vision tower is "
                              f"{vision_cfg.hidden_size} wide; pass its mm_vision_tower ({llava['mm_vision_tower']})")
    tokens = int(llava["mm_num_image_tokens"]) if llava["mm_projector_type"] == "aapool_mlp" else vision_cfg.num_patches
    if args.image_tokens not in (None, tokens):
        raise ConversionError(f"--image-tokens {args.image_tokens}: the LLaVA checkpoint uses {tokens}")
    tok, image_id = load_llava_tokenizer(args.tokenizer or args.llava)
    if len(tok) > text_cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tok)} tokens but the LLM only {text_cfg.vocab_size} "
                              "embedding rows")
    model_cfg = ModelConfig(vision=vision_cfg, text=text_cfg, image_tokens=tokens,
                            projector_hidden_act=args.projector_act, image_token_id=image_id)
    return _write(out, args, model_cfg, tok, vision_sd, comps[PROJECTOR], comps[LLM])


def _write(out: str, args, model_cfg: ModelConfig, tok, vision_sd, projector_sd, llm_sd) -> str:
    """Checks every tensor against the model, then writes tokenizer, config and weights."""
    text_cfg = model_cfg.text
    abstract = flat_params(build_abstract(model_cfg)[1])
    if text_cfg.tie_word_embeddings:
        _check_tied_head(llm_sd, getattr(llm_sd, "source", args.llm or args.llava))
    flat = {}
    for component, sd in ((VISION, vision_sd), (PROJECTOR, projector_sd), (LLM, llm_sd)):
        flat.update(hf_to_ours(component, sd, abstract, tie_word_embeddings=text_cfg.tie_word_embeddings))
    flat = {k: _to_device(v, args.dtype) for k, v in flat.items()}

    # Everything is validated; only now write (tokenizer, config, then the weights).
    _save(out, model_cfg, tok, flat)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging("INFO")
    start = time.time()
    try:
        out = convert(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # ConversionError, WeightError, ConfigError
        print(f"hf_to_jax: error: {cli.one_line(e)}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    print(f"hf_to_jax: wrote {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
