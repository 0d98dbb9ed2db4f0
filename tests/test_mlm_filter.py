"""MLM-Filter scoring: the original's prompts and parsing, and greedy scores equal to transformers.

The prompt checksums were computed from the MLM-Filter authors' batch-inference script for Qwen2.5
models (their instruction template, the four criteria texts and the qwen_instruct conversation
rendered for the captions below), so any change of a character in our copy fails here.
"""

import hashlib
import io
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import tiny_mlm_filter as tiny
from oq2vl_jax.data import mlm_filter
from oq2vl_jax.data.mlm_filter import parse_score

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "convert"))
import hf_to_jax  # noqa: E402

ORIGINAL_PROMPT_SHA256 = {
    ("itm", "a dog on a red sofa"): "88b9af2c6559924e7dc767caa384aa31e540556072f250a0ae6c8415ca185dc5",
    ("itm", "Ünïcode {braces} 100%\nsecond line"): "3535972eafe3eb303b219129fe168d55f23cbfd45cd241272afe2e7fe047a3ae",
    ("odf", "a dog on a red sofa"): "7f9fc027f3269bea69741656ec31e23f5d06c9659de52143cf39f818612a3a67",
    ("odf", "Ünïcode {braces} 100%\nsecond line"): "25e007f6b7f976d13535334016d38b41059e90e63a9da15568ff251dce63273f",
    ("ctq", "a dog on a red sofa"): "d27ddcb462a670491bf21a690d709da15d4b15c259b714ff6965f36ad43fdae9",
    ("ctq", "Ünïcode {braces} 100%\nsecond line"): "974918fd212d1d36285d5324e61b98b30687a0a282571bf8a9280931df2b99db",
    ("su", "a dog on a red sofa"): "f448d36ab3de8d51ef54918bec2255f80009141d25243390cdd4f3a9da709f81",
    ("su", "Ünïcode {braces} 100%\nsecond line"): "26240d28c6a8b6ecb076c4e46bc381c64c7a98f6dd474062d4826a25149a1ff0",
}


@pytest.mark.parametrize("metric,caption", sorted(ORIGINAL_PROMPT_SHA256))
def test_prompt_text_is_exactly_the_originals(metric, caption):
    text = mlm_filter.render_prompt(caption, metric)
    assert hashlib.sha256(text.encode()).hexdigest() == ORIGINAL_PROMPT_SHA256[metric, caption]


@pytest.mark.parametrize("text,score", [
    ("85", 85), ("7", 7), (" 42 ", 42),          # int() accepts surrounding whitespace
    ("85\nThe caption is good", 85),             # only the first line counts
    ("85,", 85), (",85;", 85), ("85;", 85), ("85;,", 85),  # "," stripped first, then ";"
    ("85,;", None),                              # ... so a "," left inside ";" stays and fails
    ("8.5", None), ("eighty", None), ("", None), ("\n85", None), ("85%", None),
    ("-3", -3), ("1_0", 10),                     # whatever Python's int() takes, as theirs
])
def test_score_parsing_follows_the_original_rules(text, score):
    assert parse_score(text) == score



@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny torch references run ~15x faster on one thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _release(root: str, projector_type: str):
    tok = tiny.build_tokenizer(os.path.join(root, "tok"))
    vdir, ldir, modules = tiny.build_release(root, tok, projector_type=projector_type)
    ck = os.path.join(root, "ck")
    assert hf_to_jax.main(["--vision", vdir, "--llava", ldir, "--out", ck]) == 0
    return ck, ldir, modules


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The layout the authors' training script gives this model: aapool_mlp, last layer."""
    return _release(str(tmp_path_factory.mktemp("mlm")), "aapool_mlp")


def _png(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("projector_type", ["aapool_mlp", pytest.param("mlp2x_gelu", marks=pytest.mark.slow)])
def test_greedy_scores_equal_transformers_llava_on_the_same_weights(release, tmp_path, projector_type):
    """Our batched, device-split scoring of a released-layout MLM-Filter equals transformers' Llava
    generating each sample alone from the same torch weights, token for token."""
    from transformers import AutoTokenizer, SiglipImageProcessor

    ck, ldir, modules = release if projector_type == "aapool_mlp" else _release(str(tmp_path), projector_type)
    scorer = mlm_filter.MLMFilterScorer(ck, "su", batch_size=8, dtype="float32")
    layer, tokens, _ = tiny.PROJECTORS[projector_type]
    assert scorer.cfg.image_tokens == tokens and scorer.cfg.vision.feature_layer == layer
    tok = AutoTokenizer.from_pretrained(ldir)  # the released tokenizer, as theirs loads it
    hf = tiny.hf_llava(modules, scorer.cfg.image_token_id, projector_type)
    processor = SiglipImageProcessor(size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE},
                                     resample=Image.BICUBIC, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    captions = ["a red bus", "photo of a cat on 12 street with more words in it", "x", "0123 numbers",
                "the the the", "a long caption " * 6, "b", "café au lait"]
    images = tiny.random_images(len(captions))
    prompts = [scorer.prompt(mlm_filter.decode_image(_png(im), tiny.IMAGE_SIZE), c) for im, c in zip(images, captions)]
    assert len({len(p.ids) for p in prompts}) > 3  # rows of the batch are really left-padded
    ours = scorer.score_prompts(prompts)

    stops = sorted({tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    expected = []
    for image, caption, prompt in zip(images, captions, prompts):
        # Their input: text pieces tokenized apart around the image, then the " " id appended.
        head, tail = mlm_filter.render_prompt(caption, "su").split("<image>")
        ids = tok(head).input_ids + [scorer.cfg.image_token_id] * tokens + tok(tail).input_ids + tok(" ").input_ids[-1:]
        assert ids == list(prompt.ids)
        pixels = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        np.testing.assert_allclose(pixels.numpy().transpose(0, 2, 3, 1), prompt.images, atol=1e-6, rtol=0)
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=2, do_sample=False,
                              eos_token_id=stops, pad_token_id=tok.pad_token_id)
        expected.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
    assert [s.text for s in ours] == expected
    # A caption holding an <image> tag or the image token is not scored (not a crash, not a shifted image).
    odd = [scorer.prompt(prompts[0].images[0], c) for c in ("see <image> here", "<|image_pad|> x")]
    assert odd == [None, None] and scorer.score_prompts(odd + prompts[:1])[:2] == [mlm_filter.Scored(None, None)] * 2
    assert [s.score for s in ours] == [parse_score(t) for t in expected]
    assert len({s.score for s in ours}) > 1 and any(s.score is not None for s in ours)


@pytest.mark.slow
def test_curate_with_mlm_filter_keeps_scores_at_or_above_min_whatever_the_batch(release, tmp_path):
    """The CLI end to end: scores in the table equal the scorer's, independent of the batch size
    (padding is masked, unlike the original's batches); kept = score >= --min; unparseable dropped."""
    from test_curate import _sample, _stats, _write_tar

    from oq2vl_jax.data import curate

    ck, _, _ = release
    d = tmp_path / "in"
    d.mkdir()
    images = tiny.random_images(10, seed=3)
    samples = [_sample(i, image=_png(im), caption=f"a photo number {i} " * (1 + i % 4)) for i, im in enumerate(images)]
    _write_tar(str(d / "00000.tar"), samples[:6])
    _write_tar(str(d / "00001.tar"), samples[6:])
    tables = []
    for batch in ("8", "16"):
        out = str(tmp_path / f"out{batch}")
        assert curate.main(["--input", str(d / "*.tar"), "--out", out, "--mlm-filter", ck, "--metric", "su",
                            "--dtype", "float32", "--batch-size", batch]) == 0
        tables.append(pq.read_table(os.path.join(out, "scores.parquet")).to_pydict())
    assert tables[0]["mlm_su_text"] == tables[1]["mlm_su_text"]
    scores = tables[0]["mlm_su"]
    assert len(set(scores)) > 1
    scorer = mlm_filter.MLMFilterScorer(ck, "su", batch_size=8, dtype="float32")
    direct = scorer.score_pairs([Image.fromarray(im) for im in images], [c for _, f in samples for c in [f["txt"].decode()]])
    assert [s.score for s in direct] == scores
    threshold = sorted(s for s in scores if s is not None)[len(scores) // 2]
    out = str(tmp_path / "kept")
    assert curate.main(["--input", str(d / "*.tar"), "--out", out, "--scores",
                        os.path.join(str(tmp_path / "out8"), "scores.parquet"), "--min", str(threshold)]) == 0
    stats = _stats(out)
    assert stats["kept"] == sum(s is not None and s >= threshold for s in scores)
    assert stats["dropped"].get("mlm_unparseable", 0) == sum(s is None for s in scores)


def test_llava_conversion_refuses_what_it_cannot_express(tmp_path):
    import json

    tok = tiny.build_tokenizer(str(tmp_path / "tok"))
    vdir, ldir, _ = tiny.build_release(str(tmp_path), tok)
    cfg_path = os.path.join(ldir, "config.json")
    cfg = json.load(open(cfg_path))
    for change, message in ((dict(mm_projector_type="linear"), "mm_projector_type='linear'"),
                            (dict(model_type="llava_llama"), "model_type 'llava_llama'"),
                            (dict(mm_hidden_size=64), "mm_hidden_size 64")):
        json.dump({**cfg, **change}, open(cfg_path, "w"))
        with pytest.raises(hf_to_jax.ConversionError, match=message):
            hf_to_jax.convert(hf_to_jax.parse_args(["--vision", vdir, "--llava", ldir, "--out", str(tmp_path / "x")]))
