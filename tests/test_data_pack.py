"""Packing tool: accounting of every sample, corrupt inputs, bad shards, determinism, re-runs, workers."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from oq2vl_jax.data import pack
from oq2vl_jax.data.demo import write_demo
from oq2vl_jax.data.records import decode_row
from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo"))
    write_demo(d, num_samples=96, image_size=32, shard_size=32)
    return d


def _cfg(demo, out, **kw):
    base = dict(tokenizer=os.path.join(demo, "tokenizer"), out=str(out), seq_len=128, image_tokens=4,
                image_size=28)
    base.update(kw)
    return pack.PackConfig(**base)


def _shards(demo):
    return sorted(os.path.join(demo, "shards", f) for f in os.listdir(os.path.join(demo, "shards")))


def _rows(path):
    from array_record.python.array_record_module import ArrayRecordReader
    r = ArrayRecordReader(path)
    rows = [decode_row(r.read()) for _ in range(r.num_records())]
    r.close()
    return rows


def _png(color=(200, 10, 10), size=40):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_demo_pack_rows_are_consistent(demo, tmp_path):
    cfg = _cfg(demo, tmp_path)
    stats = pack.run(cfg, _shards(demo), log=lambda m: None)
    assert stats["samples_in"] == stats["samples_packed"] == 96 and stats["skipped"] == {}
    assert stats["images"] == 96 and stats["max_images"] == 128 // 7
    with open(tmp_path / "stats.json") as f:
        assert json.load(f)["rows"] == stats["rows"]
    ids = special_ids(load_tokenizer(cfg.tokenizer))
    n_seen, real = 0, 0
    for name in ("00000", "00001", "00002"):
        for row in _rows(str(tmp_path / f"{name}.array_record")):
            seg = row["segment_ids"]
            n = seg.max()
            n_seen += n
            real += int((seg > 0).sum())
            assert (row["input_ids"] == ids.image).sum() == 4 * len(row["image_segment_ids"])
            assert row["image_segment_ids"].tolist() == list(range(1, n + 1))  # one image per caption
            assert (row["input_ids"][seg == 0] == ids.pad).all() and (row["loss_mask"][seg == 0] == 0).all()
            for s in range(1, n + 1):
                span = np.flatnonzero(seg == s)
                assert row["positions"][span].tolist() == list(range(len(span)))
                assert row["input_ids"][span[0]] == ids.bos and row["input_ids"][span[-1]] == ids.eos
            img = Image.open(io.BytesIO(row["image_bytes"][row["image_offsets"][0]:row["image_offsets"][1]]))
            assert img.size == (28, 28) and img.format == "JPEG"
    assert n_seen == 96 and real == stats["real_tokens"]
    assert stats["fill_rate"] == pytest.approx(real / (stats["rows"] * 128))


def test_corrupt_caption_samples_are_counted(demo, tmp_path):
    good = _png()
    shard = tmp_path / "bad.tar"
    _tar(shard, [
        ("ok.png", good), ("ok.txt", b"a red square"),
        ("corrupt.jpg", b"\xff\xd8not really a jpeg"), ("corrupt.txt", b"a red square"),
        ("empty.png", good), ("empty.txt", b"  \n"),
        ("nocap.png", good),
        ("badutf.png", good), ("badutf.txt", b"a red \xff\xfe square"),
        ("long.png", good), ("long.txt", ("a red square " * 200).encode()),
        ("meta.png", good), ("meta.json", json.dumps({"caption": "a red square on a blue background"}).encode()),
        ("noimg.txt", b"a red square"),
        ("badjson.png", good), ("badjson.json", b"{not json"),
        ("pad.png", good), ("pad.txt", b"sneaky <|image_pad|> token"),
        ("_under.png", good), ("_under.txt", b"a red square"),  # a sample like any other
        ("._ok.png", b"\x00\x05\x16\x07"),  # a macOS resource fork: not a sample
    ])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(5000))
    full = open(_shards(demo)[0], "rb").read()
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(full[: len(full) // 2 + 700])
    stats = pack.run(_cfg(demo, tmp_path / "out"), [str(shard), str(garbage), str(truncated)],
                     log=lambda m: None)
    assert set(stats["bad_shards"]) == {str(garbage), str(truncated)}
    sk = stats["skipped"]
    for reason in ("corrupt_image", "empty_caption", "missing_caption", "bad_utf8", "too_long",
                   "missing_image", "bad_json", "image_token_in_text"):
        assert sk.get(reason, 0) >= 1, reason
    assert stats["units"]["bad"] == {"samples_in": 11, "samples_packed": 3, "skipped": {
        "bad_json": 1, "bad_utf8": 1, "corrupt_image": 1, "empty_caption": 1, "image_token_in_text": 1,
        "missing_caption": 1, "missing_image": 1, "too_long": 1}, "rows": 1,
        "real_tokens": stats["units"]["bad"]["real_tokens"], "images": 3}
    assert stats["units"]["trunc"]["samples_packed"] > 0  # the readable part is kept
    assert stats["units"]["garbage"]["samples_in"] == 0
    assert stats["samples_in"] == stats["samples_packed"] + sum(sk.values())


def test_too_many_images_and_sft_failures(demo, tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.png").write_bytes(_png())
    (img_dir / "broken.png").write_bytes(b"\x89PNG garbage")
    q = lambda v: {"from": "human", "value": v}
    a = {"from": "gpt", "value": "A red square."}
    samples = [
        {"id": "ok", "image": "a.png", "conversations": [q("<image>\nWhat is it?"), a]},
        {"id": "textonly", "conversations": [q("Name a colour."), {"from": "gpt", "value": "Red."}]},
        {"id": "two", "image": ["a.png", "a.png"], "conversations": [q("<image><image>\nSame?"), a]},
        {"id": "missing", "image": "nope.png", "conversations": [q("<image>\nWhat?"), a]},
        {"id": "broken", "image": "broken.png", "conversations": [q("<image>\nWhat?"), a]},
        {"id": "mismatch", "image": "a.png", "conversations": [q("What?"), a]},
        {"id": "roles", "conversations": [a, q("x")]},
        {"id": "empty", "conversations": []},
        "not an object",
    ]
    js = tmp_path / "sft.json"
    js.write_text(json.dumps(samples))
    jl = tmp_path / "more.jsonl"
    jl.write_text(json.dumps(samples[0]) + "\n{broken json\n")
    stats = pack.run(_cfg(demo, tmp_path / "out", mode="sft", image_root=str(img_dir), max_images=1),
                     [str(js), str(jl)], log=lambda m: None)
    assert stats["samples_in"] == 11 and stats["samples_packed"] == 3
    assert stats["skipped"] == {"bad_conversation": 2, "bad_json": 1, "corrupt_image": 1, "empty_text": 1,
                                "image_tag_mismatch": 1, "missing_image": 1, "too_many_images": 1}
    assert stats["max_images_in_row"] <= 1


def test_text_mode_and_unpacked(demo, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"text": "a red square"}\n{"text": ""}\n{oops\n{"other": 1}\n'
                     + json.dumps({"text": "word " * 500}).encode() + b"\n")
    txt = tmp_path / "docs.txt"
    txt.write_bytes(b"a blue circle\n\xff\xfe\nanother doc\n")
    stats = pack.run(_cfg(demo, tmp_path / "out", mode="text"), [str(docs), str(txt)], log=lambda m: None)
    assert stats["samples_in"] == 8 and stats["samples_packed"] == 3 and stats["images"] == 0
    assert stats["skipped"] == {"bad_json": 1, "bad_utf8": 1, "empty_text": 2, "too_long": 1}
    one = pack.run(_cfg(demo, tmp_path / "one", mode="sft", packing="none"),
                   [os.path.join(demo, "sft", "sft.json")], log=lambda m: None)
    assert one["rows"] == one["samples_packed"] == one["samples_in"] > 0 and one["skipped"] == {}
    assert one["max_samples_in_row"] == 1 and one["images"] > 0


def test_deterministic_rerun_skips_done_and_workers_match(demo, tmp_path):
    shards = _shards(demo)
    logs = []
    s1 = pack.run(_cfg(demo, tmp_path / "a"), shards, log=logs.append)
    out = tmp_path / "a" / "00001.array_record"
    mtime = os.stat(out).st_mtime_ns
    logs.clear()
    s2 = pack.run(_cfg(demo, tmp_path / "a"), shards, log=logs.append)
    assert all("reused" in m for m in logs[:-1]) and os.stat(out).st_mtime_ns == mtime
    assert {k: v for k, v in s1.items()} == s2
    first = {n: (tmp_path / "a" / f"{n}.array_record").read_bytes() for n in ("00001", "00002")}
    # A parallel run into a fresh dir gives identical bytes.
    pack.run(_cfg(demo, tmp_path / "b"), shards, workers=2, log=lambda m: None)
    for name, data in first.items():
        assert (tmp_path / "b" / f"{name}.array_record").read_bytes() == data
    # Changing a setting redoes the work; outputs of units no longer in the run are removed.
    logs.clear()
    s3 = pack.run(_cfg(demo, tmp_path / "a", image_format="png"), shards[:1], log=logs.append)
    assert "00000: packed" in logs[0] and s3["image_format"] == "png"
    assert sum(m.startswith("removed 0000") for m in logs) == 6  # rows, stats, row lengths of 00001, 00002
    assert sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".array_record")) == ["00000.array_record"]


def test_window_and_cli(demo, tmp_path, capsys):
    rc = pack.main(["--input", os.path.join(demo, "shards", "{00000..00002}.tar"), "--tokenizer",
                    os.path.join(demo, "tokenizer"), "--out", str(tmp_path), "--seq-len", "128",
                    "--image-tokens", "4", "--image-size", "28", "--window", "3"])
    assert rc == 0
    stats = json.load(open(tmp_path / "stats.json"))
    assert list(stats["units"]) == ["window-00000-3"] and stats["samples_packed"] == 96
    # Repacking the same folder per shard: the loader reads exactly this run's rows, not the window's too.
    from oq2vl_jax.data.loader import resolve_source

    again = pack.run(_cfg(demo, tmp_path), _shards(demo), log=lambda m: None)
    files = resolve_source(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["00000.array_record", "00001.array_record", "00002.array_record"]
    assert sum(len(_rows(f)) for f in files) == again["rows"]
    assert not os.path.exists(tmp_path / "window-00000-3.array_record")
    assert pack.main(["--input", str(tmp_path / "nothing-*.tar"), "--tokenizer", "x", "--out", str(tmp_path)]) == 2
    assert "matched no file" in capsys.readouterr().err


def test_truncate_cuts_long_samples_and_whole_images(demo, tmp_path):
    from oq2vl_jax.data.samples import Tokens

    img = 7  # a stand-in image id: _truncate only looks for runs of it
    ids = np.array([1] * 10 + [img] * 4 + [5] * 3 + [img] * 4 + [6] * 10, np.int32)
    mask = (ids != img).astype(np.uint8)
    cut = pack._truncate(_cfg(demo, tmp_path, seq_len=20, image_tokens=4, truncate=True), Tokens(ids, mask, 2), img)
    assert (len(cut.input_ids), cut.num_images, cut.truncated) == (17, 1, True)  # the 2nd image would be cut
    np.testing.assert_array_equal(cut.input_ids, ids[:17])
    with pytest.raises(pack.SampleError, match="no target"):
        pack._truncate(_cfg(demo, tmp_path, seq_len=12, image_tokens=4), Tokens(ids, np.zeros_like(mask), 2), img)

    (tmp_path / "a.png").write_bytes(_png())
    long = {"id": "long", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square " * 100}]}
    (tmp_path / "sft.json").write_text(json.dumps([long]))
    skipped = pack.run(_cfg(demo, tmp_path / "skip", mode="sft"), [str(tmp_path / "sft.json")], log=lambda m: None)
    assert skipped["skipped"] == {"too_long": 1} and skipped["truncated"] == 0
    kept = pack.run(_cfg(demo, tmp_path / "cut", mode="sft", truncate=True), [str(tmp_path / "sft.json")],
                    log=lambda m: None)
    assert kept["samples_packed"] == 1 and kept["truncated"] == 1 and kept["images"] == 1
    (row,) = _rows(str(tmp_path / "cut" / "sft.array_record"))
    assert len(row["input_ids"]) == 128 and (row["segment_ids"] == 1).all() and row["loss_mask"].sum() > 50


def test_odd_json_and_image_fields_are_skipped_not_crashes(demo, tmp_path):
    # Valid JSON the tokenizer cannot take (lone surrogate escapes), JSON that json.loads rejects with
    # other errors than JSONDecodeError (deep nesting, over-long ints) and SFT image fields of the wrong
    # type: each is one skipped sample, never a crash of the run.
    deep, bigint, sur = "[" * 100_000, '{"text": "x", "n": ' + "1" * 5000 + "}", '{"text": "half \\ud83d"}'
    docs = tmp_path / "d.jsonl"
    docs.write_text("\n".join(['{"text": "a red square"}', deep, bigint, sur]) + "\n")
    st = pack.run(_cfg(demo, tmp_path / "t", mode="text"), [str(docs)], log=lambda m: None)
    assert st["samples_packed"] == 1 and st["skipped"] == {"bad_json": 2, "bad_utf8": 1}

    shard = tmp_path / "c.tar"
    _tar(shard, [("ok.png", _png()), ("ok.txt", b"a red square"),
                 ("sur.png", _png()), ("sur.json", b'{"caption": "a red \\ud83d square"}'),
                 ("big.png", _png()), ("big.json", b'{"caption": "x", "uid": ' + b"9" * 5000 + b"}")])
    st = pack.run(_cfg(demo, tmp_path / "c"), [str(shard)], log=lambda m: None)
    assert st["samples_packed"] == 1 and st["skipped"] == {"bad_json": 1, "bad_utf8": 1}

    (tmp_path / "a.png").write_bytes(_png())
    conv = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "Red."}]
    sft = [{"image": "a.png", "conversations": conv("<image>\nWhat?")},
           {"image": 5, "conversations": conv("<image>\nWhat?")},
           {"image": ["a.png", None], "conversations": conv("<image><image>\nWhat?")},
           {"image": "a\x00.png", "conversations": conv("<image>\nWhat?")},
           {"conversations": conv("What? \ud83d")}]
    (tmp_path / "s.json").write_text(json.dumps(sft))
    st = pack.run(_cfg(demo, tmp_path / "s", mode="sft"), [str(tmp_path / "s.json")], log=lambda m: None)
    # A .json list is parsed incrementally (ijson's C parser), which reads a lone surrogate escape as
    # "?": that conversation is packed; in .jsonl (json.loads per line) it is skipped as bad_utf8.
    assert st["samples_packed"] == 2 and st["skipped"] == {"bad_image_field": 3}
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(x) for x in sft))
    st = pack.run(_cfg(demo, tmp_path / "sl", mode="sft"), [str(tmp_path / "s.jsonl")], log=lambda m: None)
    assert st["samples_packed"] == 1 and st["skipped"] == {"bad_image_field": 3, "bad_utf8": 1}


def test_repeated_tar_key_is_another_sample(demo, tmp_path):
    shard = tmp_path / "x.tar"
    _tar(shard, [("k.png", _png()), ("k.txt", b"a red square"),
                 ("k.png", _png((0, 0, 255))), ("k.txt", b"a blue square")])
    st = pack.run(_cfg(demo, tmp_path / "o"), [str(shard)], log=lambda m: None)
    assert st["samples_in"] == st["samples_packed"] == st["images"] == 2


def test_tar_shard_is_streamed_one_sample_at_a_time(tmp_path):
    import tracemalloc

    from oq2vl_jax.data.readers import iter_tar

    big = os.urandom(1 << 20)
    shard = tmp_path / "big.tar"
    _tar(shard, [(f"{i:03d}.{ext}", big) for i in range(16) for ext in ("jpg", "txt")])
    tracemalloc.start()
    try:
        keys = [key for key, files in iter_tar(str(shard))]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys == [f"{i:03d}" for i in range(16)]
    # One sample is 2 MiB; reading copies it a few times, but never holds the 32 MiB shard.
    assert peak < 12 * len(big), f"{peak / 2**20:.1f} MiB held while reading a 32 MiB shard"


def test_tar_sample_is_a_run_of_consecutive_members(tmp_path):
    from oq2vl_jax.data.readers import iter_tar

    shard = tmp_path / "x.tar"
    _tar(shard, [("a.jpg", b"1"), ("a.txt", b"2"), ("b.jpg", b"3"), ("a.json", b"4")])
    assert list(iter_tar(str(shard))) == [("a", {"jpg": b"1", "txt": b"2"}), ("b", {"jpg": b"3"}),
                                          ("a", {"json": b"4"})]


def test_rerun_never_trusts_damaged_or_stale_markers(demo, tmp_path, monkeypatch):
    from oq2vl_jax.data.loader import resolve_source

    shards, out = _shards(demo)[:2], tmp_path / "o"
    pack.run(_cfg(demo, out), shards, log=lambda m: None)
    rows_file, marker = out / "00000.array_record", out / "00000.stats.json"
    good = rows_file.read_bytes()
    # A truncated row file and an empty marker are redone, not reused (or crashed on).
    rows_file.write_bytes(good[: len(good) // 2])
    logs = []
    pack.run(_cfg(demo, out), shards, log=logs.append)
    assert "00000: packed" in logs[0] and rows_file.read_bytes() == good
    marker.write_text("")
    logs.clear()
    pack.run(_cfg(demo, out), shards, log=logs.append)
    assert "00000: packed" in logs[0] and rows_file.read_bytes() == good

    # A run with other settings dies after writing a unit's rows, before its marker: the old marker
    # must not vouch for the new rows, and the half-done directory must not be readable as the old run.
    class Killed(BaseException):
        pass

    real = os.replace

    def replace(a, b):
        if str(b).endswith("00000.stats.json"):
            raise Killed
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        pack.run(_cfg(demo, out, image_format="png"), shards, log=lambda m: None)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        resolve_source(str(out))
    logs.clear()
    pack.run(_cfg(demo, out), shards, log=logs.append)
    assert logs[0] == "removed 00000.stats.json.tmp: left by an interrupted run"  # the killed run's temp file
    assert "00000: packed" in logs[1] and rows_file.read_bytes() == good
    assert len(resolve_source(str(out))) == 2


def test_dangling_shard_symlink_is_a_bad_shard(demo, tmp_path):
    os.symlink(str(tmp_path / "gone.tar"), str(tmp_path / "00009.tar"))
    st = pack.run(_cfg(demo, tmp_path / "o"), [_shards(demo)[0], str(tmp_path / "00009.tar")], log=lambda m: None)
    assert list(st["bad_shards"]) == [str(tmp_path / "00009.tar")] and st["samples_packed"] == 32


def test_uppercase_jsonl_is_json_lines(demo, tmp_path):
    (tmp_path / "d.JSONL").write_text('{"text": "a red square"}\n')
    pack.run(_cfg(demo, tmp_path / "o", mode="text"), [str(tmp_path / "d.JSONL")], log=lambda m: None)
    (row,) = _rows(str(tmp_path / "o" / "d.array_record"))
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    assert tok.decode(row["input_ids"][row["segment_ids"] == 1]) == "<s>a red square<|im_end|>"


def test_crlf_text_lines_lose_their_carriage_return(demo, tmp_path):
    (tmp_path / "d.txt").write_bytes(b"a red square\r\n\r\na blue circle\r\n")
    pack.run(_cfg(demo, tmp_path / "o", mode="text"), [str(tmp_path / "d.txt")], log=lambda m: None)
    (row,) = _rows(str(tmp_path / "o" / "d.array_record"))
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    docs = sorted(tok.decode(row["input_ids"][row["segment_ids"] == s]) for s in (1, 2))
    assert docs == ["<s>a blue circle<|im_end|>", "<s>a red square<|im_end|>"]


@pytest.mark.parametrize("flag, value, name", [("--max-samples-per-row", "0", "max_samples"),
                                               ("--seq-len", "0", "seq_len"), ("--jpeg-quality", "0", "jpeg_quality"),
                                               ("--window", "0", "window")])
def test_bad_settings_are_named_before_reading(demo, tmp_path, capsys, flag, value, name):
    rc = pack.main(["--input", os.path.join(demo, "shards", "00000.tar"), "--tokenizer", "x",
                    "--out", str(tmp_path / "o"), flag, value])
    assert rc == 2 and name in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_text_mode_reads_a_json_list_and_refuses_other_files(demo, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a red square"}, {"text": "a blue circle"}], indent=1))
    st = pack.run(_cfg(demo, tmp_path / "o", mode="text"), [str(tmp_path / "d.json")], log=lambda m: None)
    assert st["samples_packed"] == 2 and st["skipped"] == {} and not st["bad_shards"]
    (row,) = _rows(str(tmp_path / "o" / "d.array_record"))
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    docs = sorted(tok.decode(row["input_ids"][row["segment_ids"] == s]) for s in (1, 2))
    assert docs == ["<s>a blue circle<|im_end|>", "<s>a red square<|im_end|>"]
    # A tar shard (or any other file) is not read line by line as text documents.
    shard = _shards(demo)[0]
    st = pack.run(_cfg(demo, tmp_path / "t", mode="text"), [shard], log=lambda m: None)
    assert st["samples_in"] == 0 and "text mode reads" in st["bad_shards"][shard]


def test_rerun_that_reuses_everything_keeps_the_folder_readable(demo, tmp_path, monkeypatch):
    """A trainer may read OUT (e.g. its eval source) while a re-run finds every unit done: the
    summary must stay in place; a unit that changes removes it first."""
    from oq2vl_jax.data.loader import resolve_source

    shards, out = _shards(demo)[:2], tmp_path / "o"
    pack.run(_cfg(demo, out), shards, log=lambda m: None)
    seen = []
    real = pack.pack_unit

    def pack_unit(cfg, unit):  # what a reader sees while the run is under way
        try:
            seen.append(len(resolve_source(str(out))))
        except FileNotFoundError:
            seen.append("refused")
        return real(cfg, unit)

    monkeypatch.setattr(pack, "pack_unit", pack_unit)
    pack.run(_cfg(demo, out), shards, log=lambda m: None)
    assert seen == [2, 2]
    seen.clear()
    pack.run(_cfg(demo, out, image_format="png"), shards, log=lambda m: None)
    assert seen == [2, "refused"]


def test_tar_cut_at_a_member_boundary_is_a_bad_shard(tmp_path):
    """Stream mode reads a tar cut between members (or inside a header) as a short, whole archive;
    without its end-of-archive blocks it is reported as a bad shard, with the samples before the cut."""
    import io
    import tarfile

    from oq2vl_jax.data.readers import iter_tar

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            ti = tarfile.TarInfo(f"{i:05d}.txt")
            ti.size = 700
            tf.addfile(ti, io.BytesIO(b"x" * 700))
    raw = buf.getvalue()
    for cut, whole in ((len(raw), 3), (2 * (512 + 1024), 2), (2 * (512 + 1024) + 100, 2)):
        (tmp_path / "s.tar").write_bytes(raw[:cut])
        it, got = iter_tar(str(tmp_path / "s.tar")), []
        try:
            while True:
                got.append(next(it))
        except StopIteration as stop:
            error = stop.value
        assert len(got) == whole and (error is None) == (cut == len(raw)), (cut, error)
