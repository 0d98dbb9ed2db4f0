"""tools/convert for Qwen2-VL: a tiny HF Qwen2VLForConditionalGeneration directory -> our checkpoint
-> back, bit-identical; the export loads in transformers (model and image processor) and computes
what the original computes."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from hf_tiny import hf_qwen2_vl
from oq2vl_jax import checkpoint
from oq2vl_jax.data.qwen2_vl_text import build_tiny_qwen2_vl_tokenizer, qwen2_vl_ids

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "convert"))
import hf_to_jax  # noqa: E402
import jax_to_hf  # noqa: E402

TEXTS = ["a cat sat on the mat", "describe the image please", "hello world, naive cafe 42"] * 10
PIXELS = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 6)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    tok = build_tiny_qwen2_vl_tokenizer(TEXTS, path)
    return path, qwen2_vl_ids(tok)


def _tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _save_hf(path, tokenizer, tie=False, hub_layout=False):
    tok_dir, ids = tokenizer
    model = hf_qwen2_vl(tie=tie, vocab_size=ids.vocab_len + 2, ids=dict(
        image_token_id=ids.image, vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end))
    model.save_pretrained(path)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", **PIXELS}, f)
    if hub_layout:  # the key names of the checkpoints on the hub (transformers 4)
        sd = _tensors(path)
        for name in os.listdir(path):
            if name.startswith("model") and name.endswith((".safetensors", ".json")):
                os.remove(os.path.join(path, name))
        renamed = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
                   for k, v in sd.items()}
        save_file(renamed, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("tie,hub_layout", [(False, False), (True, True)])
def test_qwen2_vl_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, tokenizer, tie, hub_layout):
    from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

    src = str(tmp_path / "hf")
    original = _save_hf(src, tokenizer, tie=tie, hub_layout=hub_layout)
    ck, out = str(tmp_path / "ck"), str(tmp_path / "export")
    assert hf_to_jax.main(["--qwen2-vl", src, "--out", ck]) == 0
    cfg = checkpoint.resolve_checkpoint_config(ck)
    assert cfg.model.arch == "qwen2_vl"
    assert (cfg.model.qwen2_vl_vision.min_pixels, cfg.model.qwen2_vl_vision.max_pixels) == tuple(PIXELS.values())
    assert jax_to_hf.main(["--checkpoint", ck, "--out", out, "--format", "qwen2-vl"]) == 0

    want = {k: v.detach().numpy() for k, v in original.state_dict().items()}
    if tie:
        del want["lm_head.weight"]  # HF does not save a tied head
    got = _tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # Back in transformers: the same model, and an image processor with our resize bounds.
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert loaded.config.tie_word_embeddings == tie
    proc = AutoImageProcessor.from_pretrained(out)
    image = np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    inputs = proc(images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 6]]  # 28x84 within max_pixels = 28*28*6
    n = int(inputs["image_grid_thw"].prod()) // 4
    ids = tokenizer[1]
    input_ids = torch.tensor([[5, ids.vision_start] + [ids.image] * n + [ids.vision_end, 7, 9]])
    kw = dict(input_ids=input_ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
              mm_token_type_ids=(input_ids == ids.image).int())
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(**kw).logits.numpy(), original(**kw).logits.numpy())
