"""Eval predictions on a tiny checkpoint equal transformers' on the exported Llava model.

A tiny random HF SigLIP + Qwen2 (large init, so greedy decoding varies) is converted to ours and
exported as a Llava directory. Our eval answers a few-shot VQA benchmark (several images per prompt)
and AI2D-style option likelihoods, batched over 8 devices. The HF side builds each prompt the way the
original does (text split at "<image>", each piece tokenized, image slots spliced in, BOS in front),
takes pixels from the exported image processor, and runs `generate` greedily with the original's stop
tokens ("." "," "\\n"), decoding with skip_special_tokens and strip; for AI2D it softmaxes one forward
pass's last logits over the whole vocabulary and renormalises over the letters A-D.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids
from oq2vl_jax.eval import benchmarks as B
from oq2vl_jax.eval import runner
from oq2vl_jax.eval.data import read_questions
from oq2vl_jax.eval.fewshot import draw_demos
from oq2vl_jax.generate import load_checkpoint
from test_convert_hf import _convert, _export, _save_hf, tokenizer_dir  # noqa: F401 (fixture)

K = 25  # image tokens of the unpooled Llava export


@pytest.fixture(autouse=True)
def _hf_modules_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def _files(root):
    rng = np.random.default_rng(0)
    os.makedirs(root / "img")
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")

    def jsonl(name, recs):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        return str(root / name)

    words = ["cat", "mat", "hello", "world"]
    vqa = jsonl("vqa.jsonl", [{"id": f"q{i}", "image": f"img/{i}.png", "question": f"is the {words[i]} here?",
                               "answers": [words[i]] * 10} for i in range(3)])
    train = jsonl("train.jsonl", [{"id": f"t{i}", "image": f"img/{3 + i}.png", "question": "what sat on the mat?",
                                   "answers": [words[i]] * 10} for i in range(3)])
    mc = jsonl("mc.jsonl", [{"id": f"m{i}", "image": f"img/{i}.png", "question": "describe the image please",
                             "options": ["a cat", "the mat", "naive cafe"], "answer": "B"} for i in range(3)])
    return vqa, train, mc


def _hf_inputs(tok, processor, text, images, image_id):
    """The original's tokenizer_image_token + BOS: pieces between <image> tags tokenized separately."""
    ids = [tok.convert_tokens_to_ids("<s>")]
    for i, piece in enumerate(text.split("<image>")):
        if i:
            ids += [image_id] * K
        if piece:
            ids += tok(piece, add_special_tokens=False)["input_ids"]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return torch.tensor([ids]), pixels


def test_eval_predictions_equal_transformers_on_the_exported_llava(tmp_path, tokenizer_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, initializer_range=0.3)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", str(K))
    export = _export(tmp_path, ck, "llava")
    model, cfg, _ = load_checkpoint(ck, dtype="float32")
    tok = load_tokenizer(cfg.tokenizer)
    ids = special_ids(tok)
    vqa, train, mc = _files(tmp_path)

    gen = runner.make_generator(model, tok)  # all 8 devices
    bench = B.get("vqav2")
    questions, _ = read_questions(vqa, bench.read_row)
    demos = draw_demos(read_questions(train, bench.read_row)[0], 2)
    runner.evaluate(model, tok, bench, questions, str(tmp_path / "vqa"), demos=demos, generator=gen, progress=False)
    ai2d = B.get("ai2d")
    mcq, _ = read_questions(mc, ai2d.read_row)
    runner.evaluate(model, tok, ai2d, mcq, str(tmp_path / "ai2d"), generator=gen, progress=False)

    processor = AutoProcessor.from_pretrained(export)
    hf = AutoModelForImageTextToText.from_pretrained(export).eval()
    stops = [tok.encode(s, add_special_tokens=False)[0] for s in (".", ",", "\n")]
    outputs = []
    with open(tmp_path / "vqa" / "predictions.jsonl") as f:
        for rec, q in zip(map(json.loads, f), questions):
            assert rec["id"] == q.id
            images = [Image.open(d.image).convert("RGB") for d in demos] + [Image.open(q.images[0]).convert("RGB")]
            input_ids, pixels = _hf_inputs(tok, processor, rec["prompt"], images, ids.image)
            assert len(images) == 3 and rec["prompt"].count("<image>") == 3
            with torch.no_grad():
                out = hf.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=16, do_sample=False, eos_token_id=stops, pad_token_id=ids.pad)
            want = tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
            assert rec["output"] == want
            outputs.append(want)
    assert len(set(outputs)) == len(outputs)  # the prompts' images and questions change the answers

    letters = [tok.encode(c, add_special_tokens=False)[0] for c in "ABCD"]
    with open(tmp_path / "ai2d" / "predictions.jsonl") as f:
        for rec, q in zip(map(json.loads, f), mcq):
            input_ids, pixels = _hf_inputs(tok, processor, rec["prompt"], [Image.open(q.images[0]).convert("RGB")],
                                           ids.image)
            with torch.no_grad():
                logits = hf(input_ids=input_ids, pixel_values=pixels).logits[0, -1].double()
            p = torch.softmax(logits, -1)[letters]
            np.testing.assert_allclose(rec["probs"], (p / p.sum()).numpy(), atol=1e-5, rtol=0)
