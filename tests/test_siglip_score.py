"""SigLIP score: our text tower, pooling head and image-text cosine against HF SiglipModel at float32,
through tools/convert/hf_to_jax.py --siglip and the curator's --siglip-score."""

import os
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from oq2vl_jax.data import curate
from oq2vl_jax.data.siglip_score import SiglipScorer
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer
from test_curate import _sample, _stats, _write_tar

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "convert"))
import hf_to_jax  # noqa: E402

TOL = 1e-4
CAPTIONS = ["a red bus on a street", "a cat", "two dogs playing in the snow near a house", "x y z", "0123",
            "caption number 1", "caption number 2", "caption number 3"]



@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny torch references run ~15x faster on one thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A tiny random HF SiglipModel (with a stand-in BPE tokenizer: SigLIP's own needs a sentencepiece
    file) and its conversion."""
    from transformers import SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("siglip")
    tok = str(root / "tok")
    build_tiny_tokenizer(CAPTIONS * 3, tok, vocab_size=300)
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=42, patch_size=14))
    model = SiglipModel(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and the probe small; make everything matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "probe" in name:
                p.normal_(0, 0.3)
    hf_dir = str(root / "hf")
    model.save_pretrained(hf_dir)
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), hf_dir)
    out = str(root / "pair")
    assert hf_to_jax.main(["--siglip", hf_dir, "--out", out]) == 0
    return model, out


def _images(n):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3),
                                        dtype=np.uint8)) for _ in range(n)]


def test_siglip_cosine_equals_hf_siglipmodel(siglip):
    from transformers import SiglipImageProcessor

    model, pair = siglip
    scorer = SiglipScorer(pair, batch_size=8, dtype="float32")
    images = _images(len(CAPTIONS))
    ours = scorer.score(images, CAPTIONS)
    processor = SiglipImageProcessor(size={"height": 42, "width": 42}, resample=Image.BICUBIC,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = torch.tensor(scorer.token_ids(CAPTIONS), dtype=torch.long)
    assert ids.shape == (len(CAPTIONS), 12)  # padded to max_position_embeddings, as SigLIP was trained
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    expected = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)
    # Each tower's pooled output itself (before normalising), not only the cosine.
    from oq2vl_jax.data.siglip_score import load_siglip_pair

    pair_model, _ = load_siglip_pair(pair, "float32")
    text = np.asarray(pair_model.text_model(ids.numpy().astype(np.int32)))
    image = np.asarray(pair_model.vision_head(pair_model.vision_model(pixels.numpy().transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(text, out.text_model_output.pooler_output.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(image, out.vision_model_output.pooler_output.numpy(), atol=TOL, rtol=0)
    assert np.ptp(expected) > 0.05  # the scores differ between pairs


@pytest.mark.slow
def test_curate_siglip_min_keeps_pairs_at_or_above_the_threshold(siglip, tmp_path):
    _, pair = siglip
    d = tmp_path / "in"
    d.mkdir()
    _write_tar(str(d / "00000.tar"), [_sample(i) for i in range(6)])
    out = str(tmp_path / "out")
    assert curate.main(["--input", str(d / "00000.tar"), "--out", out, "--siglip-score", pair, "--batch-size", "8",
                        "--dtype", "float32"]) == 0  # scores only: all kept
    table = pq.read_table(os.path.join(out, "scores.parquet")).to_pydict()
    scores = table["siglip"]
    assert _stats(out)["kept"] == 6 and all(isinstance(s, float) for s in scores)
    threshold = float(np.median(scores))
    out2 = str(tmp_path / "out2")
    assert curate.main(["--input", str(d / "00000.tar"), "--out", out2, "--scores", os.path.join(out, "scores.parquet"),
                        "--siglip-min", str(threshold)]) == 0
    stats = _stats(out2)
    assert stats["kept"] == sum(s >= threshold for s in scores) and stats["dropped"] == {
        "below_siglip_min": sum(s < threshold for s in scores)}
