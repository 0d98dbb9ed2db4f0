"""Exact token layout, segment ids, positions and loss masks of hand-built rows (caption, SFT, text)."""
import numpy as np
import pytest

from oq2vl_jax.data.records import assemble_row, decode_row, encode_row
from oq2vl_jax.data.samples import SampleBuilder, SampleError
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_ids

K = 3  # image slots per image


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    build_tiny_tokenizer(["a red circle on a blue background", "What shape is it? A square.",
                          "You are a helpful assistant.", "user assistant system"] * 5, d, vocab_size=300)
    return load_tokenizer(d)


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_tokenizer_prepared_like_original(tok):
    ids = special_ids(tok)
    assert tok.bos_token == "<s>" and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len({ids.bos, ids.eos, ids.pad, ids.image, tok.convert_tokens_to_ids("<|endofchunk|>")}) == 5
    assert _enc(tok, "<s><|im_end|><|image_pad|>") == [ids.bos, ids.eos, ids.image]
    assert ids.vocab_len == len(tok) and max(ids.bos, ids.eos, ids.pad, ids.image) < len(tok)


def test_tokenizer_without_image_pad_gets_one(tmp_path):
    # Qwen2 (not 2.5) tokenizers have no <|image_pad|>; it is added after the other specials, which stay.
    build_tiny_tokenizer(["a red circle"] * 5, str(tmp_path), vocab_size=280, image_pad=False)
    tok = load_tokenizer(str(tmp_path))
    ids = special_ids(tok)
    assert ids.image == len(tok) - 1 and ids.vocab_len == len(tok)
    assert _enc(tok, "a<s><|image_pad|><|endofchunk|>") == [_enc(tok, "a")[0], ids.bos, ids.image,
                                                            tok.convert_tokens_to_ids("<|endofchunk|>")]
    assert tok.decode([ids.image, ids.bos], skip_special_tokens=True) == ""
    tok.save_pretrained(str(tmp_path / "again"))
    assert special_ids(load_tokenizer(str(tmp_path / "again"))) == ids


def test_caption_and_text_row_exact(tok):
    ids = special_ids(tok)
    b = SampleBuilder(tok, image_tokens=K)
    cap = b.caption("a red <image> circle")
    body = _enc(tok, "\na red <image-placeholder> circle")
    assert cap.input_ids.tolist() == [ids.bos] + [ids.image] * K + body + [ids.eos]
    assert cap.loss_mask.tolist() == [1] + [0] * K + [1] * (len(body) + 1)
    assert cap.num_images == 1
    txt = b.text("a blue square")
    assert txt.input_ids.tolist() == [ids.bos] + _enc(tok, "a blue square") + [ids.eos]
    assert txt.loss_mask.tolist() == [1] * len(txt.input_ids)

    n1, n2, L = len(cap.input_ids), len(txt.input_ids), 64
    row = assemble_row([(cap.input_ids, cap.loss_mask, [b"IMG"]), (txt.input_ids, txt.loss_mask, [])],
                       L, ids.pad)
    row = decode_row(encode_row(row))
    assert row["segment_ids"].tolist() == [1] * n1 + [2] * n2 + [0] * (L - n1 - n2)
    assert row["positions"].tolist() == list(range(n1)) + list(range(n2)) + [0] * (L - n1 - n2)
    assert row["loss_mask"].tolist() == cap.loss_mask.tolist() + [1] * n2 + [0] * (L - n1 - n2)
    assert row["input_ids"][n1 + n2:].tolist() == [ids.pad] * (L - n1 - n2)
    assert row["image_bytes"].tobytes() == b"IMG" and row["image_offsets"].tolist() == [0, 3]
    assert row["image_segment_ids"].tolist() == [1]
    assert {k: v.dtype.name for k, v in row.items()} == {
        "input_ids": "int32", "segment_ids": "int32", "positions": "int32", "loss_mask": "uint8",
        "image_bytes": "uint8", "image_offsets": "int64", "image_segment_ids": "int32"}


CONV = [{"from": "human", "value": " <image>\nWhat shape is it? "}, {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Blue."}]


@pytest.mark.parametrize("template,expected", [
    ("chatml", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n<image>\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\n"
               "A red circle.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n"
               "Blue.<|im_end|>\n"),
    # The original builder: leading <s>, and "<|im_end|>assistant\n" without "\n<|im_start|>".
    ("original", "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\n<image>\nWhat shape is it?<|im_end|>assistant\n"
                 "A red circle.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>assistant\nBlue.<|im_end|>\n"),
])
def test_sft_templates_and_loss_mask(tok, template, expected):
    ids = special_ids(tok)
    t = SampleBuilder(tok, image_tokens=K, sft_template=template).conversation(CONV)
    assert t.num_images == 1
    assert _decode(tok, t.input_ids) == expected.replace("<image>", "<|image_pad|>" * K)
    assert (t.input_ids == ids.image).sum() == K and t.loss_mask[t.input_ids == ids.image].sum() == 0
    # Targets are exactly the assistant turns with their <|im_end|> and "\n".
    assert _decode(tok, t.input_ids[t.loss_mask == 1]) == "A red circle.<|im_end|>\nBlue.<|im_end|>\n"
    a1 = _enc(tok, "A red circle.<|im_end|>\n")
    a2 = _enc(tok, "Blue.<|im_end|>\n")
    mask = t.loss_mask.tolist()
    assert mask[-len(a2):] == [1] * len(a2) and t.input_ids[-len(a2):].tolist() == a2
    start = len(mask) - len(a2) - len(_enc(tok, "<|im_start|>user\nColour?<|im_end|>" + (
        "\n<|im_start|>assistant\n" if template == "chatml" else "assistant\n"))) - len(a1)
    assert t.input_ids[start:start + len(a1)].tolist() == a1 and mask[:start] == [0] * start


def test_sample_errors(tok):
    b = SampleBuilder(tok, image_tokens=K)
    for bad, reason in [(lambda: b.caption("  "), "empty_caption"),
                        (lambda: b.caption("x <|image_pad|>"), "image_token_in_text"),
                        (lambda: b.text(""), "empty_text"),
                        (lambda: b.conversation([{"from": "gpt", "value": "hi"},
                                                 {"from": "human", "value": "x"}]), "bad_conversation"),
                        (lambda: b.conversation([{"from": "human", "value": "hi"}]), "no_assistant_turn")]:
        with pytest.raises(SampleError) as e:
            bad()
        assert e.value.reason == reason
    # The original template decides roles by parity only, like the original.
    orig = SampleBuilder(tok, image_tokens=K, sft_template="original")
    assert orig.conversation([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]).loss_mask.sum() > 0


def test_record_rejects_missing_fields():
    with pytest.raises(KeyError, match="image_bytes"):
        encode_row({"input_ids": np.zeros(3)})


def test_original_template_empty_answer_is_a_space(tok):
    # Qwen2PromptBuilder.wrap_gpt: f"{msg if msg != '' else ' '}{eos}\n"
    b = SampleBuilder(tok, image_tokens=K, sft_template="original")
    t = b.conversation([{"from": "human", "value": "x"}, {"from": "gpt", "value": ""},
                        {"from": "human", "value": "y"}, {"from": "gpt", "value": "Blue."}])
    assert _decode(tok, t.input_ids[t.loss_mask == 1]) == " <|im_end|>\nBlue.<|im_end|>\n"
