"""Each fidelity switch reproduces the original's code path (references written from the original's
code, with PIL / numpy / transformers), and the defaults are the corrected behaviour."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from oq2vl_jax.data import pack, transforms
from oq2vl_jax.data.records import decode_row
from oq2vl_jax.data.samples import SampleBuilder
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_ids

K = 3
ORIG_IMAGE = -200  # the original's placeholder id


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    build_tiny_tokenizer(["a red circle on a blue background", "What shape is it? A square.",
                          "You are a helpful assistant.", "user assistant system\n\n"] * 5, d, vocab_size=300)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


# -- the original's tokenizer_image_token (prismatic util), re-written here as the reference ---------
def original_tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
    ids = chunks[0][:1] if offset else []
    pieces = []  # chunks with separators of offset + 1 placeholders between them
    for i, c in enumerate(chunks):
        if i:
            pieces.append([ORIG_IMAGE] * (offset + 1))
        pieces.append(c)
    for piece in pieces:  # each piece loses its first `offset` items
        ids += piece[offset:]
    return ids


def original_finetune_ids(tokenizer, turns, system="You are a helpful assistant."):
    """FinetuneDataset.__getitem__ with Qwen2PromptBuilder: each turn through tokenizer_image_token."""
    out = []
    for i, t in enumerate(turns):
        msg = t["value"].strip()
        if i % 2 == 0:
            head = f"<s><|im_start|>system\n{system}<|im_end|>\n" if i == 0 else ""
            text = f"{head}<|im_start|>user\n{msg}<|im_end|>assistant\n"
        else:
            text = f"{msg or ' '}<|im_end|>\n"
        out += original_tokenizer_image_token(text, tokenizer)
    return out


def _expand(ids, image_id):
    return [x for i in ids for x in ([image_id] * K if i == ORIG_IMAGE else [i])]


@pytest.mark.parametrize("turns", [
    [{"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "A square."}],
    [{"from": "human", "value": "What shape?\n<image>"}, {"from": "gpt", "value": "A circle."},
     {"from": "human", "value": "<image>\n\nColour?"}, {"from": "gpt", "value": "Red."}],
    [{"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "A square."}],
], ids=["image_first", "image_last_then_later_turn", "text_only"])
def test_original_image_offset_equals_tokenizer_image_token(tok, turns):
    ids = special_ids(tok)
    ref = _expand(original_finetune_ids(tok, turns), ids.image)
    quirk = SampleBuilder(tok, K, "original", original_image_offset=True).conversation(turns)
    assert quirk.input_ids.tolist() == ref
    fixed = SampleBuilder(tok, K, "original").conversation(turns)
    # The default keeps exactly the dropped token(s): one per image in a turn that starts with <s>.
    first = turns[0]["value"]
    dropped = first.count("<image>") if "<image>" in first else 0
    assert len(fixed.input_ids) - len(quirk.input_ids) == dropped
    if turns[0]["value"].startswith("<image>\n"):
        nl = tok("\n", add_special_tokens=False)["input_ids"]
        at = fixed.input_ids.tolist().index(ids.image) + K
        assert fixed.input_ids[at:at + len(nl)].tolist() == nl and quirk.input_ids[at] != nl[0]


def test_reference_tokenizer_image_token_matches_the_original_layout(tok):
    # Pin the reference itself: "<s>A<image>\nB" -> [<s>, A..., -200, B...] (the "\n" dropped).
    ids = original_tokenizer_image_token("<s>a<image>\nred", tok)
    a, red = tok("a").input_ids, tok("red").input_ids
    assert ids == [tok.bos_token_id] + a + [ORIG_IMAGE] + red
    assert original_tokenizer_image_token("<image>\nred", tok) == [ORIG_IMAGE] + tok("\nred").input_ids


# -- images ---------------------------------------------------------------------------------------------
def _rand_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)


def _np(im):
    return np.asarray(im)


def _ref_resize_short_crop(arr, size):
    """torchvision Resize(size) (short side, long = int(size * long / short), PIL bicubic) then
    CenterCrop(size) (offsets round((dim - size) / 2)), on an HWC array."""
    h, w = arr.shape[:2]
    if min(h, w) != size:
        if w <= h:
            new = (size, int(size * h / w))
        else:
            new = (int(size * w / h), size)
        arr = np.asarray(Image.fromarray(arr).resize(new, Image.BICUBIC))
    h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return arr[top:top + size, left:left + size]


@pytest.mark.parametrize("wh", [(50, 30), (30, 51), (16, 40), (20, 20)])
def test_image_strategies_equal_the_original_transforms(wh):
    im, size = _rand_image(*wh), 16
    arr = _np(im)
    squash = transforms.to_square(im, size)
    assert np.array_equal(_np(squash), _np(im.resize((size, size), Image.BICUBIC)))
    crop = transforms.to_square(im, size, "resize-crop")
    assert crop.size == (size, size) and np.array_equal(_np(crop), _ref_resize_short_crop(arr, size))
    # LetterboxPad(fill = int(0.5 * 255)): int((max - w) / 2) on both sides, then the same resize-crop.
    h, w = arr.shape[:2]
    side = max(h, w)
    dy, dx = int((side - h) / 2), int((side - w) / 2)
    padded = np.pad(arr, ((dy, dy), (dx, dx), (0, 0)), constant_values=127)
    box = transforms.to_square(im, size, "letterbox")
    assert box.size == (size, size) and np.array_equal(_np(box), _ref_resize_short_crop(padded, size))


def test_letterbox_pads_with_the_mean_colour():
    im = Image.new("RGB", (64, 16), (255, 0, 0))
    out = _np(transforms.to_square(im, 32, "letterbox"))
    assert (out[:10] == 127).all() and (out[-10:] == 127).all()  # grey bands above and below
    assert (out[16, :, 0] > 200).all()  # the red image across the middle


def test_alpha_white_equals_transformers_and_drop_equals_pil_convert():
    from transformers.image_transforms import convert_to_rgb

    rgba = _rand_image(12, 10, "RGBA", seed=1)
    a = np.array(rgba)
    a[:, :4, 3] = 0  # fully transparent columns that still store colours
    rgba = Image.fromarray(a, "RGBA")
    white = transforms.to_square(rgba, 10, alpha="white")
    ref = Image.fromarray(convert_to_rgb(rgba, return_numpy=True)).resize((10, 10), Image.BICUBIC)
    assert np.array_equal(_np(white), _np(ref))
    drop = transforms.to_square(rgba, 10, alpha="drop")
    assert np.array_equal(_np(drop), _np(rgba.convert("RGB").resize((10, 10), Image.BICUBIC)))
    # Fully transparent pixels: white by default, their stored colour when dropped.
    flat = Image.fromarray(np.dstack([np.full((8, 8, 3), (200, 0, 0), np.uint8), np.zeros((8, 8), np.uint8)]))
    assert (_np(transforms.to_square(flat, 8)) == 255).all()
    assert (_np(transforms.to_square(flat, 8, alpha="drop")) == (200, 0, 0)).all()
    # Palette image with a transparent index (info["transparency"]) is composited too.
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    p.info["transparency"] = 0
    assert np.array_equal(_np(transforms.to_rgb(p)), np.array(convert_to_rgb(p, return_numpy=True)))


def test_lanczos_pre_squash_equals_the_pickle_packer():
    def packer(im):  # preprocess_caption's resize, as written there
        w, h = im.size
        if min(w, h) > 384:
            if w > h:
                im = im.resize((int(384 / w * w), 384), Image.LANCZOS)
            else:
                im = im.resize((384, int(384 / h * h)), Image.LANCZOS)
        return im

    odd = next(w for w in range(385, 3000) if int(384 / w * w) != 384)  # float rounding: 383 wide
    for wh in [(500, 400), (400, 900), (300, 1000), (odd, 390)]:
        im = _rand_image(*wh, seed=wh[0])
        ref = packer(im)
        got = transforms.lanczos_pre_squash(im, 384)
        assert got.size == ref.size and np.array_equal(_np(got), _np(ref))
        full = transforms.to_square(im, 384, pre_squash="lanczos")
        assert np.array_equal(_np(full), _np(ref.resize((384, 384), Image.BICUBIC)))
    assert transforms.lanczos_pre_squash(_rand_image(odd, 390), 384).size == (383, 384)


# -- pack ----------------------------------------------------------------------------------------------
def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _rows(path):
    from array_record.python.array_record_module import ArrayRecordReader
    r = ArrayRecordReader(path)
    rows = [decode_row(r.read()) for _ in range(r.num_records())]
    r.close()
    return rows


def test_pack_switches_reach_the_stored_rows(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (20, 36, 4), dtype=np.uint8)
    _tar(tmp_path / "00000.tar", [("a.png", _png(rgba)), ("a.txt", b"a red circle"),
                                  ("b.png", _png(rgba[:, :20, :3].copy())), ("b.txt", b"a blue square")])
    out = tmp_path / "out"
    rc = pack.main(["--input", str(tmp_path / "00000.tar"), "--tokenizer", tok_dir, "--out", str(out),
                    "--seq-len", "64", "--image-tokens", "4", "--image-size", "28", "--image-format", "png",
                    "--image-strategy", "letterbox", "--alpha", "drop", "--pad-as-target"])
    assert rc == 0
    stats = json.load(open(out / "stats.json"))
    assert stats["samples_packed"] == 2 and stats["rows"] == 1 and stats["max_samples_in_row"] == 3
    (row,) = _rows(str(out / "00000.array_record"))
    ref_img = transforms.to_square(Image.fromarray(rgba).convert("RGB"), 28, "letterbox", "drop")
    blob, off = row["image_bytes"].tobytes(), row["image_offsets"]
    images = [np.asarray(Image.open(io.BytesIO(blob[off[i]:off[i + 1]]))) for i in range(2)]
    assert any(np.array_equal(x, np.asarray(ref_img)) for x in images)

    # The original packer's pad id: its tokenizer got <|endofchunk|>, <s>, <|pad|> as specials.
    orig = AutoTokenizer.from_pretrained(tok_dir)
    orig.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<s>", "<|pad|>"]})
    orig.pad_token = "<|pad|>"
    image_id = special_ids(load_tokenizer(tok_dir)).image
    n = int((row["segment_ids"] > 0).sum())
    slack = row["segment_ids"] == row["segment_ids"].max()
    assert n == 64 and slack.sum() == 64 - int(stats["real_tokens"])
    assert (row["input_ids"][slack] == orig.pad_token_id).all()
    # The original's labels: every token but the image placeholders is a target, pads included.
    assert np.array_equal(row["loss_mask"].astype(bool), row["input_ids"] != image_id)

    # Training refuses data packed with other switches than its data config names.
    from oq2vl_jax.data.loader import PACK_SWITCHES, PackSettingsMismatch, check_pack_switches
    want = dict(image_strategy="letterbox", alpha="drop", pre_squash="none", pad_as_target=True,
                original_image_offset=False)
    assert set(want) == set(PACK_SWITCHES)
    check_pack_switches([str(out)], want)
    with pytest.raises(PackSettingsMismatch, match="image_strategy: packed 'letterbox', config 'squash'"):
        check_pack_switches([str(out)], {**want, "image_strategy": "squash"})


def test_pad_as_target_needs_ffd_and_defaults_are_corrected(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="pad_as_target"):
        pack.PackConfig(tokenizer=tok_dir, out=str(tmp_path), packing="none", pad_as_target=True)
    with pytest.raises(ValueError, match="image_strategy"):
        pack.PackConfig(tokenizer=tok_dir, out=str(tmp_path), image_strategy="crop")
    d = pack.PackConfig(tokenizer=tok_dir, out=str(tmp_path))
    assert (d.image_strategy, d.alpha, d.pre_squash, d.pad_as_target, d.original_image_offset) == (
        "squash", "white", "none", False, False)


def test_data_config_carries_the_switches():
    from oq2vl_jax.config import ConfigError, config_from_dict

    cfg = config_from_dict({"data": {"image_strategy": "letterbox", "alpha": "drop", "pre_squash": "lanczos",
                                     "pad_as_target": True, "original_image_offset": True}})
    assert (cfg.data.image_strategy, cfg.data.alpha, cfg.data.pre_squash) == ("letterbox", "drop", "lanczos")
    with pytest.raises(ConfigError, match="image_strategy"):
        config_from_dict({"data": {"image_strategy": "stretch"}})
    # Every pack-time switch of the data config is a PackConfig field of the same name.
    fields = {"image_strategy", "alpha", "pre_squash", "pad_as_target", "original_image_offset"}
    assert fields <= set(pack.PackConfig.__dataclass_fields__)
