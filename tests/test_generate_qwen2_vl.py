"""Qwen2-VL generation: greedy decoding of a batch with images of different sizes and prompts of
different lengths equals HF Qwen2VLForConditionalGeneration.generate (left padding, M-RoPE deltas)."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_tiny import QWEN2_VL_IDS, hf_qwen2_vl, our_qwen2_vl_config, state_dict_np
from oq2vl_jax.data.qwen2_vl_images import image_patches
from oq2vl_jax.generate_qwen2_vl import Qwen2VLGenerator, Qwen2VLPrompt
from oq2vl_jax.models import build_from_hf
from oq2vl_jax.models.weights import split_qwen2_vl

IMG, START, END = QWEN2_VL_IDS["image_token_id"], QWEN2_VL_IDS["vision_start_token_id"], QWEN2_VL_IDS["vision_end_token_id"]
PIXELS = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 8)
EOS, NEW = 99, 8


def test_greedy_batch_with_images_of_different_sizes_equals_hf_generate():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = hf_qwen2_vl()
    cfg = our_qwen2_vl_config(hf)
    cfg = cfg.__class__(**{**cfg.__dict__, "qwen2_vl_vision": cfg.qwen2_vl_vision.__class__(
        **{**cfg.qwen2_vl_vision.__dict__, **PIXELS})})
    model = build_from_hf(cfg, **split_qwen2_vl(state_dict_np(hf)))

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(30, 80), (90, 50), (50, 60)]]
    mine = [image_patches(im, cfg.qwen2_vl_vision) for im in images]
    tokens = [len(p) // 4 for p, _ in mine]

    def block(k):
        return [START] + [IMG] * tokens[k] + [END]

    # Row 0: two images (wide, tall) and a longer text; row 1: one square image, short text.
    rows = [[5] + block(0) + [7, 8] + block(1) + list(rng.integers(3, 99, 6)), block(2) + [9, 10]]
    prompts = [Qwen2VLPrompt(rows[0], mine[:2]), Qwen2VLPrompt(rows[1], mine[2:])]
    gen = Qwen2VLGenerator(model, pad_id=0, stop_ids=[EOS], pad_multiple=8)
    ours = gen(prompts, max_new_tokens=NEW, batch_size=2)

    t = max(map(len, rows))
    ids = torch.zeros((2, t), dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        att[i, t - len(r):] = 1
    px = Qwen2VLImageProcessorPil(**PIXELS)(images=images, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=att, pixel_values=px["pixel_values"],
                          image_grid_thw=px["image_grid_thw"], mm_token_type_ids=(ids == IMG).int(),
                          max_new_tokens=NEW, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    for i in range(2):
        want = out[i, t:].tolist()
        want = want[:want.index(EOS) + 1] if EOS in want else want
        assert ours[i] == want, (i, ours[i], want)
    assert any(len(o) > 1 for o in ours)  # it really decoded past the prefill


@pytest.mark.slow
def test_cli_chat_on_a_converted_checkpoint_equals_hf_generate(tmp_path, capsys):
    """python -m oq2vl_jax.generate on a hf_to_jax --qwen2-vl checkpoint: the tokenizer's chat
    template, the checkpoint's resize bounds, greedy decoding; HF generate on the same prompt agrees."""
    import json
    import os
    import shutil
    import sys

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from oq2vl_jax import generate
    from oq2vl_jax.data.qwen2_vl_text import build_tiny_qwen2_vl_tokenizer, qwen2_vl_ids

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "convert"))
    import hf_to_jax

    tok = build_tiny_qwen2_vl_tokenizer(["a cat sat on the mat", "what is it", "user\n", "assistant\n"] * 10,
                                        str(tmp_path / "tok"))
    ids = qwen2_vl_ids(tok)
    hf = hf_qwen2_vl(vocab_size=ids.vocab_len + 2, ids=dict(
        image_token_id=ids.image, vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end))
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    for name in os.listdir(tmp_path / "tok"):
        shutil.copy(tmp_path / "tok" / name, src)
    (src / "preprocessor_config.json").write_text(json.dumps(PIXELS))
    assert hf_to_jax.main(["--qwen2-vl", str(src), "--out", str(tmp_path / "ck")]) == 0
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    image.save(tmp_path / "q.png")
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(tmp_path / "ck"), "--format", "chat", "--prompt", "what is it",
                          "--image", str(tmp_path / "q.png"), "--max-new-tokens", "6", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]

    px = Qwen2VLImageProcessorPil(**PIXELS)(images=[image], return_tensors="pt")
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                                    "what is it"}]}], tokenize=False, add_generation_prompt=True)
    n = int(px["image_grid_thw"].prod()) // 4
    prompt = torch.tensor([tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = hf.generate(input_ids=prompt, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                          mm_token_type_ids=(prompt == ids.image).int(), max_new_tokens=6, do_sample=False,
                          eos_token_id=[ids.im_end, ids.pad], pad_token_id=ids.pad,
                          suppress_tokens=list(range(len(tok), ids.vocab_len + 2)))
    want = out[0, prompt.shape[1]:].tolist()
    stop = next((i for i, t in enumerate(want) if t in (ids.im_end, ids.pad)), None)
    assert ours == (want if stop is None else want[:stop + 1])
