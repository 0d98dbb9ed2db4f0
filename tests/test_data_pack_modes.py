"""pack --mode interleaved (OBELICS-style documents laid out as the original's packer does, FFD packed,
every document accounted for) and streamed SFT input (json lists read incrementally, packed in
bounded batches)."""
import base64
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from oq2vl_jax.data import pack
from oq2vl_jax.data.records import decode_row
from oq2vl_jax.data.samples import SampleBuilder, SampleError
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_ids

K = 3
ORIG_IMAGE = -200


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    build_tiny_tokenizer(["a red circle on a blue background", "an intro about shapes. The end."] * 5, d,
                         vocab_size=300)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def original_obelics_ids(tokenizer, texts):
    """preprocess_obelics_interleaved (pickle packer) on an already-filtered `texts`, as written there:
    the corpus string, tokenizer_image_token (no <s> first, so offset 0), <s> prepended, a trailing
    placeholder stripped, <|im_end|> appended."""
    corpus = "".join("<image>\n" if t is None else t.replace("<image>", "<image-placeholder>") + "<|endofchunk|>"
                     for t in texts)
    chunks = [tokenizer(c).input_ids for c in corpus.split("<image>")]
    ids = []
    for i, c in enumerate(chunks):
        ids += ([ORIG_IMAGE] if i else []) + c
    if ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    while ids[-1] == ORIG_IMAGE:
        ids.pop()
    if ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


def _expand(ids, image_id):
    return [x for i in ids for x in ([image_id] * K if i == ORIG_IMAGE else [i])]


def test_interleaved_document_equals_the_original_packer(tok):
    ids = special_ids(tok)
    b = SampleBuilder(tok, K)
    texts = ["An intro about <image> shapes.", None, "a red circle", None, " The end."]
    got = b.interleaved(texts)
    assert got.input_ids.tolist() == _expand(original_obelics_ids(tok, texts), ids.image)
    assert got.num_images == 2
    assert got.loss_mask.tolist() == (got.input_ids != ids.image).astype(int).tolist()
    eoc = tok.convert_tokens_to_ids("<|endofchunk|>")
    assert (got.input_ids == eoc).sum() == 3  # after each text chunk
    # Trailing images are dropped (never followed by text); the rest is the original's layout.
    tail = b.interleaved(texts + [None, None])
    assert tail.input_ids.tolist() == got.input_ids.tolist() and tail.num_images == 2
    with pytest.raises(SampleError, match="no_image"):
        b.interleaved(["text, then only an image", None])


def _img(size=(8, 8), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return {"image_base64": base64.b64encode(buf.getvalue()).decode()}


def _doc(texts, infos):
    return json.dumps({"texts": texts, "image_info": infos}).encode()


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


def test_pack_interleaved_accounts_for_every_document(tok_dir, tok, tmp_path):
    ids = special_ids(tok)
    good = [_doc(["an intro", None, "a red circle", None, "The end."], [None, _img(), None, _img(), None])
            for _ in range(6)]
    members = [(f"d{i}.json", d) for i, d in enumerate(good)]
    members += [
        ("none.json", _doc(["only text"], [None])),                                       # no_image
        ("many.json", _doc(["x"] + [None] * 10, [None] + [_img()] * 10)),                # too_many_images
        ("bad.json", _doc(["x", None], [None, {"image_base64": "!!notbase64"}])),         # corrupt_image
        ("thin.json", _doc(["x", None, "y", None, "z"], [None, _img((1, 8)), None, _img(), None])),
        ("nojson.txt", b"stray"),                                                         # missing_json
        ("garbage.json", b"{not json"),                                                   # bad_json
    ]
    _tar(tmp_path / "00000.tar", members)
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.write(good[0].decode() + "\n" + "[1, 2]\n")
    cfg = pack.PackConfig(tokenizer=tok_dir, out=str(tmp_path / "out"), mode="interleaved", seq_len=64,
                          image_tokens=K, image_size=8)
    stats = pack.run(cfg, [str(tmp_path / "00000.tar"), str(tmp_path / "docs.jsonl")], log=lambda m: None)
    assert stats["samples_in"] == 14
    assert stats["skipped"] == {"bad_json": 2, "corrupt_image": 1, "missing_json": 1, "no_image": 1,
                                "too_many_images": 1}
    assert stats["samples_packed"] == 8 and stats["images"] == 6 * 2 + 1 + 2
    rows = _rows(str(tmp_path / "out" / "00000.array_record"))
    assert len(rows) < 7  # FFD put several documents in a row
    for row in rows:
        n_img = len(row["image_segment_ids"])
        assert (row["input_ids"] == ids.image).sum() == n_img * K
        for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            seg = row["input_ids"][row["segment_ids"] == s]
            assert seg[0] == ids.bos and seg[-1] == ids.eos
            assert (seg == ids.image).sum() == K * (row["image_segment_ids"] == s).sum()


def _conv(i):
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": "a red circle " * (1 + i % 5)},
                                             {"from": "gpt", "value": "a blue background " * (1 + i % 3)}]}


def test_sft_json_is_streamed_and_packed_in_bounded_batches(tok_dir, tmp_path):
    from oq2vl_jax.data import readers

    convs = [_conv(i) for i in range(30)]
    (tmp_path / "s.json").write_text(json.dumps(convs))
    base = dict(tokenizer=tok_dir, mode="sft", seq_len=128, image_tokens=K, image_size=8)
    whole = pack.run(pack.PackConfig(out=str(tmp_path / "a"), **base), [str(tmp_path / "s.json")], log=lambda m: None)
    part = pack.run(pack.PackConfig(out=str(tmp_path / "b"), max_samples_in_memory=8, **base),
                    [str(tmp_path / "s.json")], log=lambda m: None)
    for st in (whole, part):
        assert st["samples_in"] == st["samples_packed"] == 30 and st["skipped"] == {}
    assert part["real_tokens"] == whole["real_tokens"] and part["rows"] >= whole["rows"]
    rows = _rows(str(tmp_path / "b" / "s.array_record"))
    assert len(rows) == part["rows"] and sum(int(r["segment_ids"].max()) for r in rows) == 30
    # Each batch of 8 is FFD-packed on its own: the rows are those of FFD over each batch.
    from oq2vl_jax.data.ffd import first_fit_decreasing
    b = SampleBuilder(load_tokenizer(tok_dir), K)
    lengths = [len(b.conversation(c["conversations"]).input_ids) for c in convs]
    per_batch = [first_fit_decreasing(lengths[i:i + 8], 128, [0] * len(lengths[i:i + 8]), 0)
                 for i in range(0, 30, 8)]
    assert part["rows"] == sum(len(bins) for bins in per_batch)
    assert sorted(int(r["segment_ids"].max()) for r in rows) == sorted(len(x) for bins in per_batch for x in bins)

    # Incremental: a list broken part way yields the samples before the break, then a file error.
    text = json.dumps(convs)
    cut = text.index('{"id": "c20"')
    (tmp_path / "broken.json").write_text(text[:cut] + '{"id": oops}]')
    errors = []
    got = [k for k, _ in readers.iter_json_records(str(tmp_path / "broken.json"), errors)]
    assert got == [f"broken.json:{i}" for i in range(20)] and "unreadable json" in errors[0]
    st = pack.run(pack.PackConfig(out=str(tmp_path / "c"), **base), [str(tmp_path / "broken.json")],
                  log=lambda m: None)
    assert st["samples_packed"] == 20 and list(st["bad_shards"]) == [str(tmp_path / "broken.json")]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf " + json.dumps(convs[:2]).encode())
    errors = []
    assert len(list(readers.iter_json_records(str(tmp_path / "bom.json"), errors))) == 2 and not errors
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    assert list(readers.iter_json_records(str(tmp_path / "obj.json"), errors)) == []
    assert errors == ["json file is not a list of samples"]
