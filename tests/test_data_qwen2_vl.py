"""Qwen2-VL data: packed SFT rows equal what Qwen2-VL-Instruct's chat template, HF's image processor
and HF's get_rope_index make of the same conversations; packing is resumable like the other modes."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hf_tiny import hf_qwen2_vl
from oq2vl_jax.data import pack
from oq2vl_jax.data.qwen2_vl_rows import Qwen2VLRowDecoder
from oq2vl_jax.data.qwen2_vl_text import build_tiny_qwen2_vl_tokenizer, load_qwen2_vl_tokenizer, qwen2_vl_ids
from oq2vl_jax.models.config import Qwen2VLVisionConfig

# Qwen2-VL-Instruct's chat_template (tokenizer_config.json on the hub): the reference rendering.
OFFICIAL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
PIXELS = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 8)
SIZES = {"a.png": (50, 60), "b.png": (30, 80), "c.png": (90, 50)}
CONVS = [
    {"id": "two", "image": ["b.png", "c.png"], "conversations": [
        {"from": "human", "value": "<image>\nand <image>\nwhat differs?"}, {"from": "gpt", "value": "the shape"},
        {"from": "human", "value": "and the cat?"}, {"from": "gpt", "value": "a cat sat on the mat"}]},
    {"id": "one", "image": "a.png", "conversations": [
        {"from": "human", "value": "describe <image> please"}, {"from": "gpt", "value": "hello world"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}]},
]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("q2data")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
    with open(d / "sft.json", "w") as f:
        json.dump(CONVS, f)
    build_tiny_qwen2_vl_tokenizer(["a cat sat on the mat", "describe the image please", "what differs",
                                   "hello world", "system\nYou are a helpful assistant.", "user\n",
                                   "assistant\n"] * 10, str(d / "tok"))
    cfg = pack.PackConfig(tokenizer=str(d / "tok"), out=str(d / "out"), mode="qwen2vl_sft", seq_len=256,
                          image_format="png", max_patches=160, **PIXELS)
    stats = pack.run(cfg, [str(d / "sft.json")], log=lambda m: None)
    return d, cfg, stats


def _rows(out):
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(os.path.join(out, "sft.array_record"))
    rows = [reader.read() for _ in range(reader.num_records())]
    reader.close()
    return rows


def _official(tok, conv, n_tokens):
    """Token ids of a LLaVA conversation through the official template, each image pad expanded to its
    image's token count as HF's Qwen2VLProcessor does."""
    messages = []
    for i, turn in enumerate(conv["conversations"]):
        parts = []
        for j, text in enumerate(turn["value"].split("<image>")):
            if j:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": "user" if i % 2 == 0 else "assistant",
                         "content": parts if i % 2 == 0 else turn["value"]})
    text = tok.apply_chat_template(messages, chat_template=OFFICIAL_TEMPLATE, tokenize=False)
    pieces = text.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(n_tokens, pieces[1:]))
    assert len(pieces) - 1 == len(n_tokens)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sft_rows_match_the_official_template_hf_processor_and_rope_index(packed):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    d, cfg, stats = packed
    assert stats["samples_packed"] == 3 and stats["rows"] == 1
    tok = load_qwen2_vl_tokenizer(cfg.tokenizer)
    ids = qwen2_vl_ids(tok)
    vision = Qwen2VLVisionConfig(**PIXELS)
    row = Qwen2VLRowDecoder(256, 4, 160, vision, ids.image)(_rows(cfg.out)[0])
    proc = Qwen2VLImageProcessorPil(**PIXELS)
    hf = hf_qwen2_vl(vocab_size=ids.vocab_len + 2, ids=dict(image_token_id=ids.image, vision_start_token_id=
                     ids.vision_start, vision_end_token_id=ids.vision_end))
    seg = row["segment_ids"]
    expected = {c["id"]: np.array(_official(tok, c, _grids_tokens(proc, d, c))) for c in CONVS}
    patch_start, found = 0, set()
    for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        got = row["input_ids"][where]
        conv = next(c for c in CONVS if np.array_equal(expected[c["id"]], got))
        found.add(conv["id"])
        names = _names(conv)
        # Loss on the assistant answers (+ <|im_end|>\n) only.
        answers = "".join(t["value"] + "<|im_end|>\n" for t in conv["conversations"][1::2])
        assert tok.decode(got[row["loss_mask"][where] == 1]) == answers
        if names:
            ref = proc(images=[Image.open(d / n) for n in names], return_tensors="pt")
            pv = ref["pixel_values"].numpy().reshape(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588)
            n = len(pv)
            np.testing.assert_allclose(row["patches"][patch_start:patch_start + n], pv, atol=1e-5, rtol=0)
            patch_start += n
            ids_t = torch.from_numpy(got.astype(np.int64))[None]
            pos, _ = hf.model.get_rope_index(ids_t, (ids_t == ids.image).int(), image_grid_thw=ref["image_grid_thw"])
            np.testing.assert_array_equal(row["positions"][:, where], pos[:, 0].numpy())
        else:
            np.testing.assert_array_equal(row["positions"][:, where], np.tile(np.arange(len(where)), (3, 1)))
    assert found == {"two", "one", "text"}
    assert patch_start == np.count_nonzero(row["patch_segment_ids"])


def _names(conv):
    names = conv.get("image") or []
    return [names] if isinstance(names, str) else names


def _grids_tokens(proc, d, conv):
    names = _names(conv)
    if not names:
        return []
    grids = proc(images=[Image.open(d / n) for n in names], return_tensors="np")["image_grid_thw"]
    return [int(g.prod()) // 4 for g in grids]


def test_repacking_reuses_every_done_unit(packed):
    _, cfg, _ = packed
    log = []
    again = pack.run(cfg, [os.path.join(os.path.dirname(cfg.out), "sft.json")], log=log.append)
    assert again["rows"] == 1 and again["samples_packed"] == 3
    assert ": reused," in log[0]
    changed = pack.PackConfig(**{**cfg.__dict__, "max_pixels": 28 * 28 * 6})  # other resize: redone
    log.clear()
    pack.run(changed, [os.path.join(os.path.dirname(cfg.out), "sft.json")], log=log.append)
    assert ": packed," in log[0]


def test_caption_rows_hold_each_image_at_its_own_token_count(packed):
    """qwen2vl_caption: [vision start, the image's (h/28)(w/28) pads, vision end] + caption + <|im_end|>,
    loss on the caption and <|im_end|>; the patches are HF's processor's."""
    import io
    import tarfile

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    d, sft_cfg, _ = packed
    captions = {"a.png": "a cat sat on the mat", "b.png": "hello world", "c.png": "describe the image"}
    with tarfile.open(d / "caps.tar", "w") as tf:
        for i, (name, cap) in enumerate(captions.items()):
            for ext, data in (("png", (d / name).read_bytes()), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    cfg = pack.PackConfig(**{**sft_cfg.__dict__, "mode": "qwen2vl_caption", "out": str(d / "caps")})
    stats = pack.run(cfg, [str(d / "caps.tar")], log=lambda m: None)
    assert stats["samples_packed"] == 3 and stats["rows"] == 1
    tok = load_qwen2_vl_tokenizer(cfg.tokenizer)
    ids = qwen2_vl_ids(tok)
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(os.path.join(cfg.out, "caps.array_record"))
    row = Qwen2VLRowDecoder(256, 4, 160, Qwen2VLVisionConfig(**PIXELS), ids.image)(reader.read())
    reader.close()
    proc = Qwen2VLImageProcessorPil(**PIXELS)
    seg, start = row["segment_ids"], 0
    for s in range(1, 4):
        got = row["input_ids"][seg == s]
        name = next(n for n, c in captions.items() if tok.decode(got[row["loss_mask"][seg == s] == 1]) == c + "<|im_end|>")
        ref = proc(images=[Image.open(d / name)], return_tensors="np")
        n = int(ref["image_grid_thw"][0].prod()) // 4
        want = [ids.vision_start] + [ids.image] * n + [ids.vision_end] + tok(captions[name])["input_ids"] + [ids.im_end]
        assert got.tolist() == want
        pv = ref["pixel_values"].reshape(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588)
        np.testing.assert_allclose(row["patches"][start:start + len(pv)], pv, atol=1e-5, rtol=0)
        start += len(pv)
