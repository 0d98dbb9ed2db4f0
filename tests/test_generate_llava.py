"""Greedy generation with images against HF `generate` on our exported Llava / pooled Llava.

A tiny random checkpoint (HF SigLIP + Qwen2 with a large init, so greedy decoding doesn't collapse
onto one repeated token) is converted to ours, exported with tools/convert/jax_to_hf.py and loaded
with AutoModelForImageTextToText. Our side goes through the library's own request path
(make_prompts: chat format, load_image) and one left-padded batch of two requests with different
images and prompt lengths; the HF side gets each request from the exported processor. Both must see
the same input ids (image slots expanded alike) and the same pixels, and produce the same tokens.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids
from oq2vl_jax.generate import Generator, load_checkpoint, make_prompts
from test_convert_hf import _convert, _export, _save_hf, tokenizer_dir  # noqa: F401 (fixture)

STEPS = 12
REQUESTS = [("describe the image please", (90, 120)), ("hello", (64, 40))]  # (prompt, image HxW)


@pytest.fixture(autouse=True)
def _hf_modules_cache(tmp_path, monkeypatch):
    """Remote code is copied into HF_MODULES_CACHE; keep it out of the user's cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for _, hw in REQUESTS]


@pytest.mark.parametrize("fmt,image_tokens", [("llava", 25), ("pooled-llava", 9)])
def test_greedy_with_images_matches_exported_llava_generate(tmp_path, tokenizer_dir, fmt, image_tokens):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, initializer_range=0.3)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", str(image_tokens))
    out = _export(tmp_path, ck, fmt)

    # Ours: the checkpoint as the CLI loads it, requests rendered as the CLI's chat format does.
    model, cfg, _ = load_checkpoint(ck, dtype="float32")
    tok = load_tokenizer(cfg.tokenizer)
    ids = special_ids(tok)
    images = _images()
    requests = [{"prompt": p, "images": [im]} for (p, _), im in zip(REQUESTS, images)]
    prompts = make_prompts(model.cfg, tok, requests, fmt="chat")

    # HF: the exported processor and model, one request at a time.
    remote = fmt == "pooled-llava"
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=remote)
    hf = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=remote).eval()
    assert hf.generation_config.eos_token_id == ids.eos  # <|im_end|>, our stop id below
    hf_inputs = []
    for (text, _), image, ours in zip(REQUESTS, images, prompts):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=Image.fromarray(image), text=chat, return_tensors="pt")
        # Same ids (chat template, tokenization, image_tokens slots) and same pixels on both sides.
        assert inputs["input_ids"][0].tolist() == list(ours.ids)
        assert list(ours.ids).count(ids.image) == image_tokens
        np.testing.assert_allclose(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), ours.images, atol=1e-6,
                                   rtol=0)
        hf_inputs.append(inputs)
    assert len({len(p.ids) for p in prompts}) == 2  # the batch below is really left-padded

    def hf_generate(eos):
        outs = []
        for inputs in hf_inputs:
            with torch.no_grad():
                res = hf.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos)
            outs.append(res[0, inputs["input_ids"].shape[1]:].tolist())
        return outs

    # Both requests in one batch; no vocab_limit, as HF's argmax runs over every embedding row.
    expected = hf_generate(ids.eos)
    assert expected[0] != expected[1] and all(len(set(e)) > 3 for e in expected), expected
    gen = Generator(model, pad_id=ids.pad, stop_ids=[ids.eos], pad_multiple=8)
    assert gen(prompts, max_new_tokens=STEPS, batch_size=2) == expected
    # The images matter: swapping them changes what is generated.
    swapped = [dataclasses.replace(p, images=q.images) for p, q in zip(prompts, prompts[::-1])]
    assert all(a != b for a, b in zip(gen(swapped, max_new_tokens=STEPS, batch_size=2), expected))

    # A stop token that ends the first row early while the second one goes on (or stops elsewhere).
    stop = expected[0][4]
    early = hf_generate(stop)
    assert early[0] == expected[0][:expected[0].index(stop) + 1]
    assert Generator(model, pad_id=ids.pad, stop_ids=[stop], pad_multiple=8)(
        prompts, max_new_tokens=STEPS, batch_size=2) == early
