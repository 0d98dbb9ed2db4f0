"""Every shipped config loads, validates and builds its model abstractly."""

import dataclasses
import functools
import glob
import os

import pytest

from oq2vl_jax.config import ConfigError, load_config
from oq2vl_jax.models import build_abstract, count_params

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


@functools.lru_cache(maxsize=None)
def _built_params(model_cfg) -> int:
    # Configs with the same model section (sft, paper_sft, large_sft) build it once (~40 s each).
    _, state = build_abstract(model_cfg)
    return count_params(state)


# Full-size variants of an already-built model (tens of seconds each) run with -m slow.
SLOW_CONFIGS = ("mix.yaml", "large_sft.yaml", "paper_sft.yaml")


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_CONFIGS else p
                                  for p in CONFIGS], ids=os.path.basename)
def test_config_loads_and_builds(path):
    cfg = load_config(path)
    assert cfg.data.global_batch_size % cfg.train.micro_batches == 0
    # What the tokenizer would give (these configs leave it to be derived).
    model = dataclasses.replace(cfg.model, image_token_id=cfg.model.image_token_id or 0,
                                text=dataclasses.replace(cfg.model.text, vocab_size=cfg.model.text.vocab_size or 512))
    n = _built_params(model)
    if cfg.model.arch == "qwen2_vl" and cfg.model.text.hidden_size == 1536:  # Qwen2-VL-2B, counted by HF
        assert n == _hf_qwen2_vl_2b_params()
    elif cfg.model.text.hidden_size == 1536:  # the full-size configs: Qwen2.5-1.5B + so400m + projector
        assert n == 1_543_714_304 + 412_987_248 + 4_131_840


def _hf_qwen2_vl_2b_params() -> int:
    """Qwen2VLForConditionalGeneration at Qwen2-VL-2B's sizes, on the meta device (no memory)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
        tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())  # a tied head is counted once


def test_bad_keys_and_values_are_named():
    path = CONFIGS[0]
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) in model.text: hidden"):
        load_config(path, ["model.text.hidden=3"])
    with pytest.raises(ConfigError, match="data.sources"):
        load_config(path, ["data.sources=7"])
    with pytest.raises(ConfigError, match="model: image_tokens=10 is not a square"):
        load_config(path, ["model.image_tokens=10"])  # not a square
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match=r"override 'optim.lr_multipliers=.*not valid YAML"):
        load_config(path, ['optim.lr_multipliers=[["a\\.", 1]]'])  # "\." is no YAML escape
    # Values that would crash minutes in (after the first compile) are refused at load.
    for override, match in (("train.checkpoint_every=0", "checkpoint_every >= 1"), ("train.log_every=0", "log_every"),
                            ("train.keep_last=-1", "keep_last >= 0"), ("mesh.fsdp=0", "fsdp=0"),
                            ("optim.lr=.nan", "lr >= 0"), ("optim.warmup_ratio=1.5", "warmup_ratio"),
                            ("optim.b2=1", "b2 < 1"), ("optim.lr_multipliers=[[a, -1]]", "lr_multipliers >= 0"),
                            ("train.profile_steps=[3, 2]", "profile_steps")):
        with pytest.raises(ConfigError, match=match):
            load_config(path, [override])


def test_lr_multipliers_load_from_yaml():
    cfg = load_config(CONFIGS[0], ["optim.lr_multipliers=[['^multi_modal_projector\\.', 10], [lm_head, 0.5]]"])
    assert cfg.optim.lr_multipliers == ((r"^multi_modal_projector\.", 10.0), ("lm_head", 0.5))


def test_epochs_set_steps_from_the_packed_row_count(tmp_path):
    import json

    from oq2vl_jax.resolve import steps_from_epochs as resolve_steps

    (tmp_path / "caption").mkdir()
    (tmp_path / "caption" / "stats.json").write_text(json.dumps({"rows": 1_221_000}))
    pretrain = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain.yaml")
    cfg = load_config(pretrain, [f"data.sources=[{{path: {tmp_path / 'caption'}}}]"])
    assert cfg.train.epochs == 1
    assert resolve_steps(cfg).train.steps == 4770  # ceil(1,221,000 rows / 256): ~5B tokens, one pass
    assert resolve_steps(load_config(pretrain, [f"data.sources=[{{path: {tmp_path / 'caption'}}}]",
                                                "train.epochs=2.5"])).train.steps == 11924
    assert resolve_steps(load_config(pretrain, ["train.epochs=0", "train.steps=7"])).train.steps == 7
    with pytest.raises(ConfigError, match="no row count in .*nowhere"):
        resolve_steps(load_config(pretrain, ["data.sources=[{path: nowhere}]"]))
    with pytest.raises(ConfigError, match="exactly one data source"):
        resolve_steps(load_config(pretrain, ["data.sources=[{path: a}, {path: b}]"]))


def _llm_params(t) -> int:
    """Qwen2 parameter count from its config (tied head): embedding, layers, final norm."""
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    layer = (t.hidden_size * (t.hidden_size + 2 * kv) + t.hidden_size + 2 * kv  # q, k, v with biases
             + t.hidden_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size)
    return t.vocab_size * t.hidden_size + t.num_hidden_layers * layer + t.hidden_size


def test_mix_follows_the_second_paper():
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "mix.yaml"))
    assert _llm_params(cfg.model.text) == 1_543_714_304  # Qwen2.5-1.5B, as the full-size build counts
    tokens = cfg.train.steps * cfg.data.global_batch_size * cfg.data.seq_len
    per_step = cfg.data.global_batch_size * cfg.data.seq_len
    assert 0 <= tokens - 20 * _llm_params(cfg.model.text) < per_step  # 20 tokens per parameter
    assert cfg.optim.schedule_offset == 0 and cfg.optim.warmup_ratio > 0  # re-warm a finished LLM
    proj = [m for r, m in cfg.optim.lr_multipliers if r.startswith("^multi_modal_projector")]
    assert proj and cfg.optim.lr * proj[0] >= 1e-4  # a random projector that trains
    assert not any(f.startswith("^multi_modal_projector") for f in cfg.optim.freeze)
    weights = {s.path.rsplit("/", 1)[1]: s.weight for s in cfg.data.sources}
    assert weights["caption"] / sum(weights.values()) == pytest.approx(0.1)
