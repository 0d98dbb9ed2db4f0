"""python -m oq2vl_jax.data.curate on small DataComp-style shards (jpg/png + txt + json with uid).

Scores come from a hand-written scores table (--scores) so these tests need no model; the MLM-Filter
and SigLIP paths through the CLI are in the slow tests at the end.
"""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from oq2vl_jax.data import curate, curate_score, readers


def _uid(i: int) -> str:
    return f"{(i * 0x9E3779B97F4A7C15) % (1 << 128):032x}"


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, format=fmt, **({"compress_level": seed % 9} if fmt == "PNG" else {}))
    return out.getvalue()


def _write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]], keep_fraction: float = 1.0) -> None:
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    if keep_fraction < 1:
        with open(path, "r+b") as f:
            f.truncate(int(os.path.getsize(path) * keep_fraction))


def _sample(i: int, image: bytes | None = None, caption: str | None = None, uid: str | None = None):
    uid = _uid(i) if uid is None else uid
    caption = f"caption number {i}" if caption is None else caption
    return f"{i:09d}", {"jpg": _image(i) if image is None else image, "txt": caption.encode(),
                        "json": json.dumps({"uid": uid, "caption": caption}).encode()}


def _shards(tmp_path, n_shards=3, per=6) -> tuple[str, list]:
    d = tmp_path / "in"
    d.mkdir()
    for s in range(n_shards):
        _write_tar(str(d / f"{s:05d}.tar"), [_sample(s * per + i) for i in range(per)])
    return str(d / ("{00000..%05d}.tar" % (n_shards - 1))), list(range(n_shards * per))


def _run(*args) -> int:
    return curate.main(list(args))


def _kept_uids(out: str) -> list[str]:
    uids = []
    for path in readers.resolve_inputs([os.path.join(out, "shards", "*.tar")]):
        for _, files in readers.iter_tar(path):
            uids.append(curate_score._uid(files))
    return uids


def _stats(out: str) -> dict:
    with open(os.path.join(out, "stats.json")) as f:
        return json.load(f)


def _accounted(stats: dict) -> bool:
    return stats["kept"] + sum(stats["dropped"].values()) + sum(stats["unreadable"].values()) == stats["samples_in"]


def _u128(uids: list[str]) -> np.ndarray:
    return np.array([divmod(int(u, 16), 1 << 64) for u in uids], np.dtype("u8,u8"))


def test_uid_keep_and_drop_lists_select_by_the_json_uid_and_reshard(tmp_path):
    pattern, ids = _shards(tmp_path)
    keep = str(tmp_path / "keep.npy")
    np.save(keep, _u128([_uid(i) for i in (1, 2, 3, 7, 8, 13, 17)] + [_uid(999)]))  # DataComp's u8,u8 pairs
    drop = tmp_path / "drop.txt"
    drop.write_text(f"{_uid(2)}\n{_uid(8).upper()}\n\n")  # text list, case-insensitive hex
    out = str(tmp_path / "out")
    assert _run("--input", pattern, "--out", out, "--keep-uids", keep, "--drop-uids", str(drop),
                "--samples-per-shard", "2") == 0
    assert _kept_uids(out) == [_uid(i) for i in (1, 3, 7, 13, 17)]  # input order kept
    assert sorted(os.listdir(os.path.join(out, "shards"))) == [f"{j:06d}.{e}" for j in range(3) for e in ("json", "tar")]
    stats = _stats(out)
    assert stats["dropped"] == {"drop_uids": 2, "not_in_keep_uids": 11} and _accounted(stats)
    assert stats["selectors"] == {"keep_uids": {"not_in_keep_uids": 11, "pass": 5}}
    table = pq.read_table(os.path.join(out, "scores.parquet")).to_pydict()
    assert table["uid"] == [_uid(i) for i in ids] and table["decision"].count("kept") == 5


def test_dedup_drops_later_repeats_by_decoded_pixels_and_by_uid(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    png_a, png_b = _image(100, "PNG"), _image(109, "PNG")  # other seeds: other pixels
    a = np.asarray(Image.open(io.BytesIO(png_a)))
    reencoded = io.BytesIO()
    Image.fromarray(a).save(reencoded, format="PNG", compress_level=9)
    assert reencoded.getvalue() != png_a  # other bytes, same decoded pixels
    samples = [_sample(0, image=png_a), _sample(1, image=reencoded.getvalue()), _sample(2, uid=_uid(0)),
               _sample(3, image=png_b), _sample(4)]
    _write_tar(str(d / "00000.tar"), samples[:3])
    _write_tar(str(d / "00001.tar"), samples[3:] + [_sample(5, image=png_a)])  # across shards too
    out = str(tmp_path / "out")
    assert _run("--input", str(d / "*.tar"), "--out", out, "--dedup") == 0
    assert _kept_uids(out) == [_uid(i) for i in (0, 3, 4)]
    stats = _stats(out)
    assert stats["dropped"] == {"duplicate_pixels": 2, "duplicate_uid": 1} and _accounted(stats)
    # Without --dedup all six are kept.
    assert _run("--input", str(d / "*.tar"), "--out", str(tmp_path / "all")) == 0
    assert _stats(str(tmp_path / "all"))["kept"] == 6


def _scores_table(path: str, shard_paths: list[str], per: int, scores: dict[int, str | None]) -> None:
    rows = {"shard": [], "index": [], "key": [], "mlm_su": [], "mlm_su_text": []}
    for s, shard in enumerate(shard_paths):
        for i in range(per):
            n = s * per + i
            text = scores.get(n)
            rows["shard"].append(shard)
            rows["index"].append(i)
            rows["key"].append(f"{n:09d}")
            rows["mlm_su_text"].append(text)
            rows["mlm_su"].append(curate_parse(text))
    pq.write_table(pa.table(rows), path)


def curate_parse(text):
    from oq2vl_jax.data.mlm_filter import parse_score

    return None if text is None else parse_score(text)


def test_union_of_mlm_threshold_and_uid_list_and_unparseable_scores_counted(tmp_path):
    pattern, ids = _shards(tmp_path, n_shards=2, per=5)
    shard_paths = readers.resolve_inputs([pattern])
    texts = {0: "90", 1: "85", 2: "84", 3: "n/a", 4: "99;", 5: "12", 6: "7", 8: "86\nbecause", 9: "abc"}  # 7: unscored
    table = str(tmp_path / "scores.parquet")
    _scores_table(table, ["/elsewhere/" + os.path.basename(p) for p in shard_paths], 5, texts)  # matched by name
    keep = tmp_path / "dfn.txt"
    keep.write_text("\n".join(_uid(i) for i in (2, 3, 6)))
    out = str(tmp_path / "out")
    assert _run("--input", pattern, "--out", out, "--scores", table, "--min", "85", "--keep-uids", str(keep)) == 0
    # score >= 85: 0, 1, 4, 8; uid list: 2, 3, 6 -> their union, in input order.
    assert _kept_uids(out) == [_uid(i) for i in (0, 1, 2, 3, 4, 6, 8)]
    stats = _stats(out)
    assert stats["dropped"] == {"not_selected": 3} and _accounted(stats)
    assert stats["selectors"]["mlm"] == {"below_mlm_min": 3, "mlm_unparseable": 2, "mlm_unscored": 1, "pass": 4}
    assert stats["scores"]["mlm_su"]["unparseable"] == 2
    # The MLM threshold alone names each failure.
    out2 = str(tmp_path / "out2")
    assert _run("--input", pattern, "--out", out2, "--scores", table, "--min", "85") == 0
    assert _stats(out2)["dropped"] == {"below_mlm_min": 3, "mlm_unparseable": 2, "mlm_unscored": 1}
    # The written table reuses as --scores: the same selection again.
    out3 = str(tmp_path / "out3")
    assert _run("--input", pattern, "--out", out3, "--scores", os.path.join(out, "scores.parquet"), "--min", "85",
                "--keep-uids", str(keep)) == 0
    assert _kept_uids(out3) == _kept_uids(out)


def test_corrupt_samples_are_counted_and_not_fatal(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    bad_json = ("000000002", {"jpg": _image(2), "txt": b"fine caption", "json": b"{not json"})
    samples = [_sample(0), _sample(1, image=b"\xff\xd8 not a jpeg"), bad_json,
               ("000000003", {"txt": b"no image", "json": b"{}"}), ("000000004", {"jpg": _image(4)}), _sample(5)]
    _write_tar(str(d / "00000.tar"), samples)
    _write_tar(str(d / "00001.tar"), [_sample(10 + i) for i in range(4)], keep_fraction=0.5)  # cut midway
    (d / "00002.tar").write_bytes(b"this is not a tar file at all" * 10)
    out = str(tmp_path / "out")
    assert _run("--input", str(d / "*.tar"), "--out", out, "--dedup") == 0
    stats = _stats(out)
    table = pq.read_table(os.path.join(out, "scores.parquet")).to_pydict()
    first = [(st, u) for sh, st, u in zip(table["shard"], table["status"], table["uid"]) if sh.endswith("00000.tar")]
    assert first == [("ok", _uid(0)), ("corrupt_image", _uid(1)), ("ok", None), ("missing_image", None),
                     ("missing_caption", None), ("ok", _uid(5))]  # a bad json only loses the uid
    # The cut shard is a bad shard and yields what could be read (its last, partial sample lacks its caption).
    assert stats["samples_in"] == 6 + 3 and stats["unreadable"] == {"corrupt_image": 1, "missing_caption": 2,
                                                                     "missing_image": 1}
    assert stats["kept"] == 5 and _accounted(stats)
    assert [os.path.basename(p) for p in stats["bad_shards"]] == ["00001.tar", "00002.tar"]  # cut, not a tar
    assert _kept_uids(out) == [_uid(0), None, _uid(5), _uid(10), _uid(11)]


def test_resume_after_a_kill_reuses_finished_shards_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    pattern, _ = _shards(tmp_path, n_shards=4, per=3)
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    args = ["--input", pattern, "--samples-per-shard", "5", "--dedup"]
    assert _run(*args, "--out", ref) == 0

    real_read = readers.iter_tar
    calls = []

    def killed_on_third(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_read(path)

    monkeypatch.setattr(readers, "iter_tar", killed_on_third)
    assert _run(*args, "--out", out) == 130
    monkeypatch.setattr(readers, "iter_tar", real_read)
    done = {f: os.stat(os.path.join(out, "scores", f)).st_mtime_ns for f in ("00000.parquet", "00001.parquet")}
    assert not os.path.exists(os.path.join(out, "scores", "00002.json"))
    assert _run(*args, "--out", out) == 0
    assert done == {f: os.stat(os.path.join(out, "scores", f)).st_mtime_ns for f in done}  # not rescored
    for f in sorted(os.listdir(os.path.join(ref, "shards"))):
        assert open(os.path.join(out, "shards", f), "rb").read() == open(os.path.join(ref, "shards", f), "rb").read()
    assert _stats(out) == _stats(ref)
    # Killed while writing output shards: the finished ones are kept, the rest written on the re-run.
    shutil.rmtree(os.path.join(out, "shards"))
    real_write = curate.write_shard
    writes = []

    def killed_on_second(cfg, j, rows, cache):
        writes.append(j)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real_write(cfg, j, rows, cache)

    monkeypatch.setattr(curate, "write_shard", killed_on_second)
    assert _run(*args, "--out", out) == 130
    assert not os.path.exists(os.path.join(out, "stats.json"))  # the folder is changing
    monkeypatch.setattr(curate, "write_shard", real_write)
    first = os.stat(os.path.join(out, "shards", "000000.tar")).st_mtime_ns
    assert _run(*args, "--out", out) == 0
    assert os.stat(os.path.join(out, "shards", "000000.tar")).st_mtime_ns == first
    for f in sorted(os.listdir(os.path.join(ref, "shards"))):
        assert open(os.path.join(out, "shards", f), "rb").read() == open(os.path.join(ref, "shards", f), "rb").read()
    # A re-run with another shard size rewrites the shards and removes the now surplus ones.
    assert _run(*args[:2], "--out", out, "--samples-per-shard", "100", "--dedup") == 0
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["000000.json", "000000.tar"]


def test_shards_split_across_processes_give_the_single_process_result(tmp_path, monkeypatch):
    pattern, _ = _shards(tmp_path, n_shards=3, per=3)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    assert _run("--input", pattern, "--out", ref, "--samples-per-shard", "2") == 0
    args = ["--input", pattern, "--out", out, "--samples-per-shard", "2"]
    monkeypatch.setattr(curate, "_process", lambda: (0, 2))
    assert _run(*args) == 2  # process 1 has not scored its shard yet: named, no traceback
    assert sorted(f for f in os.listdir(os.path.join(out, "scores")) if f.endswith(".json")) == ["00000.json", "00002.json"]
    monkeypatch.setattr(curate, "_process", lambda: (1, 2))
    assert _run(*args) == 0  # scores 00001, writes the odd output shards
    assert sorted(f for f in os.listdir(os.path.join(out, "shards")) if f.endswith(".tar")) == ["000001.tar", "000003.tar"]
    monkeypatch.setattr(curate, "_process", lambda: (0, 2))
    assert _run(*args) == 0
    for f in os.listdir(os.path.join(ref, "shards")):
        assert open(os.path.join(out, "shards", f), "rb").read() == open(os.path.join(ref, "shards", f), "rb").read()
    assert _stats(out) == _stats(ref)


def test_curated_shards_are_what_the_packer_reads(tmp_path):
    from oq2vl_jax.data import pack
    from oq2vl_jax.data.tokenizer import build_tiny_tokenizer

    pattern, _ = _shards(tmp_path, n_shards=2, per=4)
    out = str(tmp_path / "out")
    keep = tmp_path / "keep.txt"
    keep.write_text("\n".join(_uid(i) for i in range(0, 8, 2)))
    assert _run("--input", pattern, "--out", out, "--keep-uids", str(keep), "--samples-per-shard", "3") == 0
    tok = str(tmp_path / "tok")
    build_tiny_tokenizer([f"caption number {i}" for i in range(10)], tok, vocab_size=300)
    cfg = pack.PackConfig(tokenizer=tok, out=str(tmp_path / "packed"), seq_len=64, image_tokens=4, image_size=28)
    stats = pack.run(cfg, readers.resolve_inputs([os.path.join(out, "shards", "*.tar")]), log=lambda m: None)
    assert stats["samples_in"] == stats["samples_packed"] == 4


@pytest.mark.parametrize("args,message", [
    (["--keep-uids", "missing.npy"], "missing.npy"),
    (["--min", "85"], "--min thresholds MLM-Filter scores"),
    (["--metric", "xyz", "--scores", "s.parquet"], "unknown MLM-Filter metric 'xyz'"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
])
def test_bad_input_is_one_named_line_and_exit_2(tmp_path, capsys, args, message):
    pattern, _ = _shards(tmp_path, n_shards=1, per=1)
    (tmp_path / "s.parquet").write_bytes(b"")
    os.chdir(tmp_path)
    assert _run("--input", pattern, "--out", str(tmp_path / "out"), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_uid_lists_read_datacomp_pairs_uint64_columns_strings_and_text_alike(tmp_path):
    from oq2vl_jax.data.curate_select import UidListError, load_uid_list

    uids = [_uid(i) for i in (5, 1, 3, 1)]
    pairs = _u128(uids)
    paths = {"pairs.npy": pairs, "cols.npy": np.stack([pairs["f0"], pairs["f1"]], 1),
             "strings.npy": np.array(uids)}
    for name, arr in paths.items():
        np.save(tmp_path / name, arr)
    (tmp_path / "uids.txt").write_text("\n".join(u.upper() for u in uids) + "\n")
    expected = np.unique(pairs)
    for name in list(paths) + ["uids.txt"]:
        np.testing.assert_array_equal(load_uid_list(str(tmp_path / name)), expected, err_msg=name)
    (tmp_path / "bad.txt").write_text(f"{_uid(1)}\nnot-a-uid\n")
    with pytest.raises(UidListError, match=r"bad.txt:2: 'not-a-uid'"):
        load_uid_list(str(tmp_path / "bad.txt"))
    np.save(tmp_path / "floats.npy", np.zeros(3))
    with pytest.raises(UidListError, match="floats.npy"):
        load_uid_list(str(tmp_path / "floats.npy"))
