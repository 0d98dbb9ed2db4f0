"""Grain loaders: shapes, save/restore, process sharding, mixing by weight, eval pass, errors."""
import hashlib
import os

import numpy as np
import pytest

from oq2vl_jax.data import pack
from oq2vl_jax.data.demo import write_demo
from oq2vl_jax.data.loader import LoaderConfig, make_eval_iterator, make_train_iterator

SEQ, K, SIZE, MAXI = 64, 4, 28, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("loader"))
    write_demo(d, num_samples=96, image_size=32, shard_size=32)
    common = dict(tokenizer=os.path.join(d, "tokenizer"), seq_len=SEQ, image_tokens=K, image_size=SIZE,
                  max_images=MAXI)
    shards = sorted(os.path.join(d, "shards", f) for f in os.listdir(os.path.join(d, "shards")))
    cap = pack.run(pack.PackConfig(out=os.path.join(d, "cap"), **common), shards, log=lambda m: None)
    pack.run(pack.PackConfig(out=os.path.join(d, "text"), mode="text", **common),
             [os.path.join(d, "text", "text.jsonl")], log=lambda m: None)
    return d, cap


def _cfg(d, sources=None, **kw):
    base = dict(sources=sources or ((os.path.join(d, "cap"), 1.0),), batch_size=2, seq_len=SEQ,
                max_images=MAXI, image_size=SIZE, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


def _key(batch, i):
    return hashlib.sha1(batch["input_ids"][i].tobytes()).hexdigest()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_shapes_and_values(data):
    d, _ = data
    b = next(make_train_iterator(_cfg(d), process_index=0, process_count=1))
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "input_ids": ((2, SEQ), "int32"), "segment_ids": ((2, SEQ), "int32"),
        "positions": ((2, SEQ), "int32"), "loss_mask": ((2, SEQ), "int32"),
        "images": ((2, MAXI, SIZE, SIZE, 3), "float32"), "image_mask": ((2, MAXI), "bool"),
        "image_segment_ids": ((2, MAXI), "int32"), "corrupt": ((2,), "int32")}
    assert (b["corrupt"] == 0).all()
    assert b["images"].min() >= -1 and b["images"].max() <= 1 and b["images"][b["image_mask"]].std() > 0.1
    assert (b["images"][~b["image_mask"]] == 0).all()
    # One image per caption: slots in use = segments in the row.
    assert (b["image_mask"].sum(1) == b["segment_ids"].max(1)).all()


def test_uint8_images_are_the_raw_pixels_of_the_float_ones(data):
    d, _ = data
    f = next(make_train_iterator(_cfg(d), process_index=0, process_count=1))
    u = next(make_train_iterator(_cfg(d, image_dtype="uint8"), process_index=0, process_count=1))
    assert u["images"].dtype == np.uint8
    np.testing.assert_array_equal(u["input_ids"], f["input_ids"])
    real = f["image_mask"]
    np.testing.assert_allclose(u["images"][real].astype(np.float32) * (2 / 255) - 1, f["images"][real], atol=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_save_restore_reproduces_batches(data, workers):
    d, _ = data
    cfg = _cfg(d, num_workers=workers)
    it = make_train_iterator(cfg, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    it2 = make_train_iterator(cfg, process_index=0, process_count=1)
    it2.set_state(state)
    for e in expected:
        _same(e, next(it2))
    for i in (it, it2):
        getattr(i, "close", lambda: None)()


@pytest.mark.slow  # default-suite time (about 10 minutes on 2 cores); run with -m slow
def test_batches_do_not_depend_on_the_number_of_workers(data):
    """Workers get whole batches: the train stream is the same for any num_workers, and the eval pass
    keeps every row even when there are fewer batches than workers."""
    d, cap = data
    streams = []
    for workers in (0, 3):
        it = make_train_iterator(_cfg(d, num_workers=workers, batch_size=3), process_index=0, process_count=1)
        streams.append([next(it) for _ in range(5)])
        getattr(it, "close", lambda: None)()
    for a, b in zip(*streams):
        _same(a, b)
    for workers in (0, 2, 8):
        batches = list(make_eval_iterator(_cfg(d, num_workers=workers, batch_size=cap["rows"] // 2),
                                          process_index=0, process_count=1))
        assert len(batches) == 2, workers
        assert sum(int(b["segment_ids"][i].any()) for b in batches for i in range(len(b["segment_ids"]))) == cap["rows"]


def test_processes_see_disjoint_rows(data):
    d, cap = data
    rows = cap["rows"]
    seen = []
    for p in (0, 1):
        it = make_train_iterator(_cfg(d, batch_size=1), process_index=p, process_count=2)
        seen.append({_key(next(it), 0) for _ in range(rows // 2)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == rows
    evals = [[_key(b, i) for b in make_eval_iterator(_cfg(d, batch_size=5), process_index=p, process_count=2)
              for i in range(5) if b["segment_ids"][i].any()] for p in (0, 1)]
    assert not set(evals[0]) & set(evals[1]) and len(evals[0]) + len(evals[1]) == rows


def test_eval_pass_is_fixed_shape_and_padded(data):
    d, cap = data
    batches = list(make_eval_iterator(_cfg(d, batch_size=4), process_index=0, process_count=3))
    per_process = -(-cap["rows"] // 3)
    assert len(batches) == -(-per_process // 4)
    real = sum(int(b["segment_ids"][i].any()) for b in batches for i in range(4))
    assert real == len(range(0, cap["rows"], 3))
    assert all(b["input_ids"].shape == (4, SEQ) for b in batches)


def test_mixing_respects_weights(data):
    d, _ = data
    cfg = _cfg(d, sources=((os.path.join(d, "cap"), 0.2), (os.path.join(d, "text"), 0.8)), batch_size=8)
    it = make_train_iterator(cfg, process_index=0, process_count=1)
    n_cap = n = 0
    for _ in range(25):
        b = next(it)
        n_cap += int(b["image_mask"].any(1).sum())
        n += 8
    assert abs(n_cap / n - 0.2) < 0.05


def test_config_mismatch_errors(data):
    d, _ = data
    with pytest.raises(ValueError, match="max_images"):
        make_train_iterator(_cfg(d, max_images=2), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="image_tokens=9"):
        make_train_iterator(_cfg(d, image_tokens=9), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seq_len"):
        make_train_iterator(_cfg(d, seq_len=32), process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError):
        make_train_iterator(_cfg(d, sources=((os.path.join(d, "nothing"), 1.0),)), process_index=0,
                            process_count=1)
    with pytest.raises(ValueError, match="packing=none"):
        make_train_iterator(_cfg(d, mode="unpacked_sft"), process_index=0, process_count=1)


def test_row_with_too_many_images_is_refused(data, tmp_path):
    d, _ = data
    # Copied away from its stats.json, so the per-row check in the decoder is what must fire.
    src = tmp_path / "00000.array_record"
    src.write_bytes(open(os.path.join(d, "cap", "00000.array_record"), "rb").read())
    src = str(src)
    it = make_train_iterator(_cfg(d, sources=((src, 1.0),), max_images=1), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="max_images=1 slots"):
        next(it)


def test_orbax_checkpoint_of_iterator(data, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    d, _ = data
    cfg = _cfg(d)
    it = make_train_iterator(cfg, process_index=0, process_count=1)
    next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)), force=True)
    mngr.wait_until_finished()
    want = next(it)
    it2 = make_train_iterator(cfg, process_index=0, process_count=1)
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    _same(want, next(it2))


def test_unpacked_sft_rows(data):
    d, _ = data
    pack.run(pack.PackConfig(tokenizer=os.path.join(d, "tokenizer"), out=os.path.join(d, "sft1"), mode="sft",
                             seq_len=SEQ, image_tokens=K, image_size=SIZE, max_images=MAXI, packing="none"),
             [os.path.join(d, "sft", "sft.json")], log=lambda m: None)
    it = make_train_iterator(_cfg(d, sources=((os.path.join(d, "sft1"), 1.0),), mode="unpacked_sft",
                                  batch_size=4), process_index=0, process_count=1)
    for _ in range(3):
        b = next(it)
        assert (b["segment_ids"].max(1) == 1).all() and (b["positions"][:, 0] == 0).all()
        assert (b["image_mask"].sum(1) <= 1).all() and (b["loss_mask"].sum(1) > 0).all()


def _rewrite_first_record(src_dir, dst_dir, damage):
    """A copy of the packed source whose first row record is passed through `damage`."""
    import shutil

    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, "00000.array_record")
    r = ArrayRecordReader(path)
    recs = [r.read() for _ in range(r.num_records())]
    r.close()
    recs[0] = damage(recs[0])
    w = ArrayRecordWriter(path, "group_size:1")
    for rec in recs:
        w.write(rec)
    w.close()
    return recs


def test_damaged_image_or_record_is_skipped_and_counted(data, tmp_path):
    """Bad input is not fatal: a damaged image masks its sample out, a damaged record becomes padding;
    both are counted in the batch's `corrupt`, and the other rows are untouched."""
    from oq2vl_jax.data.records import decode_row, encode_row

    d, _ = data

    def zero_image_header(rec):
        row = {k: v.copy() for k, v in decode_row(rec).items()}
        o = row["image_offsets"]
        row["image_bytes"][o[0]:o[0] + 4] = 0
        return encode_row(row)

    def first_batch(src):
        it = make_train_iterator(_cfg(d, sources=((src, 1.0),), shuffle=False, batch_size=2),
                                 process_index=0, process_count=1)
        return next(it)

    good = first_batch(os.path.join(d, "cap"))
    recs = _rewrite_first_record(os.path.join(d, "cap"), str(tmp_path / "img"), zero_image_header)
    b = first_batch(str(tmp_path / "img"))
    assert b["corrupt"].tolist() == [1, 0]
    row = decode_row(recs[0])
    seg = row["image_segment_ids"][0]
    want = good["loss_mask"][0] * (good["segment_ids"][0] != seg)
    np.testing.assert_array_equal(b["loss_mask"][0], want)  # only the sample of the bad image is dropped
    assert (b["images"][0, 0] == 0).all()
    np.testing.assert_array_equal(b["images"][0, 1:], good["images"][0, 1:])
    np.testing.assert_array_equal(b["images"][1], good["images"][1])

    _rewrite_first_record(os.path.join(d, "cap"), str(tmp_path / "rec"), lambda rec: b"junk" + rec[4:])
    b = first_batch(str(tmp_path / "rec"))
    assert b["corrupt"].tolist() == [1, 0] and b["loss_mask"][0].sum() == 0 and not b["image_mask"][0].any()
    np.testing.assert_array_equal(b["input_ids"][1], good["input_ids"][1])


def test_restore_refuses_a_differently_built_loader(data, tmp_path):
    """The saved position means nothing to a loader that reads other rows: refused, not followed."""
    import shutil

    d, _ = data
    src = tmp_path / "src"
    src.mkdir()
    for name in ("00000", "00001"):
        shutil.copy(os.path.join(d, "cap", name + ".array_record"), src)
    glob_ = str(src / "*.array_record")
    two = ((os.path.join(d, "cap"), 0.5), (os.path.join(d, "text"), 0.5))
    base = _cfg(d, sources=((glob_, 1.0),))
    it = make_train_iterator(base, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    for other in (_cfg(d, sources=((glob_, 1.0),), batch_size=3), _cfg(d, sources=((glob_, 1.0),), seed=4),
                  _cfg(d, sources=two), _cfg(d, sources=((glob_, 1.0),), num_workers=1)):
        it2 = make_train_iterator(other, process_index=0, process_count=1)
        with pytest.raises(ValueError, match="reads the data differently"):
            it2.set_state(state)
        getattr(it2, "close", lambda: None)()
    with pytest.raises(ValueError, match="process_index"):
        make_train_iterator(base, process_index=1, process_count=2).set_state(state)
    shutil.copy(os.path.join(d, "cap", "00002.array_record"), src)  # same path, more rows now
    with pytest.raises(ValueError, match="sources differ"):
        make_train_iterator(base, process_index=0, process_count=1).set_state(state)


def test_source_without_rows_is_refused(data, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    d, _ = data
    ArrayRecordWriter(str(tmp_path / "x.array_record"), "group_size:1").close()
    with pytest.raises(ValueError, match="has no rows"):
        next(make_train_iterator(_cfg(d, sources=((str(tmp_path / "*.array_record"), 1.0),)), process_index=0,
                                 process_count=1))
