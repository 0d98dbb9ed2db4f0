"""Faults a shared cluster produces (a second writer, kill -9, a flipped bit, a full or read-only disk,
Ctrl-C, odd inputs): each ends in the right result or one named line (exit 2), nothing lost.
The end-to-end training scenarios are marked slow (each compiles and runs the tiny model)."""

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from oq2vl_jax.data.tokenizer import build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
TEXTS = ["a red circle on a blue background", "a cat sat on the mat", "hello world"] * 10


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)


@pytest.fixture
def holder(tmp_path):
    """Starts a process that takes a folder's lock and waits; yields a starter, kills what it started."""
    procs = []

    def start(folder, what="a test writer"):
        code = (f"import sys, time; from oq2vl_jax import locks; locks.hold({str(folder)!r}, {what!r}).acquire(); "
                "print('held', flush=True); time.sleep(600)")
        p = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


# -- locks -----------------------------------------------------------------------------------------


def test_a_live_lock_is_refused_naming_host_and_pid_and_a_killed_holders_lock_is_taken_over(tmp_path, holder):
    from oq2vl_jax import locks

    p = holder(tmp_path / "work")
    with pytest.raises(locks.LockHeld, match=rf"host {socket.gethostname()}, PID {p.pid}\b"):
        locks.hold(tmp_path / "work", "a second writer").acquire()
    p.send_signal(signal.SIGKILL)
    p.wait()
    with locks.hold(tmp_path / "work", "the restart") as lock:  # kill -9 + restart: no manual cleanup
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert not os.path.exists(lock.path)


def test_a_lock_whose_pid_was_reused_by_a_newer_process_is_stale(tmp_path):
    from oq2vl_jax import locks

    folder = tmp_path / "w"
    folder.mkdir()
    # Our own PID, but recorded with another start time: the process that wrote it is gone.
    mine = locks._start_time(os.getpid())
    (folder / locks.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                      "start": mine - 1}))
    with locks.hold(folder, "x"):
        pass


def test_a_second_trainer_on_a_workdir_exits_2_naming_the_first(tmp_path, holder, capsys):
    from oq2vl_jax.train import main

    p = holder(tmp_path / "run", "a training run")
    rc = main(["--config", TINY, "--workdir", str(tmp_path / "run"), "--set", "data.sources=[{path: nowhere}]"])
    err = capsys.readouterr().err
    assert rc == 2 and f"PID {p.pid}" in err and "a training run" in err, err
    assert not os.path.exists(tmp_path / "run" / "config.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny tokenizer and two caption shards of 3 samples each (PNG images, .txt captions)."""
    root = tmp_path_factory.mktemp("shards")
    build_tiny_tokenizer(TEXTS, str(root / "tok"), vocab_size=300)
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", b"a red circle on a blue background")):
                    info = tarfile.TarInfo(f"s{s}_{i}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


def _pack_argv(shards, out, *inputs):
    return ["--input", *(inputs or [str(shards / "00000.tar")]), "--tokenizer", str(shards / "tok"), "--out",
            str(out), "--seq-len", "64", "--image-tokens", "4", "--image-size", "28"]


def test_a_second_packer_into_an_output_folder_exits_2_and_deletes_nothing(tmp_path, shards, holder, capsys):
    from oq2vl_jax import locks

    from oq2vl_jax.data import pack

    out = tmp_path / "out"
    assert pack.main(_pack_argv(shards, out, str(shards / "00001.tar"))) == 0
    before = sorted(os.listdir(out))
    p = holder(out, "a pack run")
    assert pack.main(_pack_argv(shards, out)) == 2  # other inputs: would delete 00001 as "earlier run"
    assert f"PID {p.pid}" in capsys.readouterr().err
    assert sorted(set(os.listdir(out)) - {locks.LOCK_FILE}) == before  # only the holder's lock added


def test_a_second_curate_run_into_an_output_folder_exits_2(tmp_path, shards, holder, capsys):
    from oq2vl_jax.data import curate

    p = holder(tmp_path / "cur", "a curate run")
    assert curate.main(["--input", str(shards / "00000.tar"), "--out", str(tmp_path / "cur"), "--dedup"]) == 2
    assert f"PID {p.pid}" in capsys.readouterr().err
    assert os.listdir(tmp_path / "cur") == [".oq2vl.lock"]


def test_pack_removes_temporary_files_of_a_killed_run_and_leaves_none_after_a_failure(tmp_path, shards,
                                                                                       monkeypatch):
    from oq2vl_jax.data import pack

    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.array_record.tmp-99999").write_bytes(b"half")
    (out / "stats.json.tmp").write_text("{")
    assert pack.main(_pack_argv(shards, out)) == 0
    assert not [f for f in os.listdir(out) if ".tmp" in f]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pack, "encode_row", full)
    assert pack.main(_pack_argv(shards, tmp_path / "out2")) == 2
    assert not [f for f in os.listdir(tmp_path / "out2") if ".tmp" in f and f != locks.LOCK_FILE]


# -- pack inputs -----------------------------------------------------------------------------------


def test_a_brace_range_with_missing_shards_is_refused_unless_allowed(shards, capsys):
    from oq2vl_jax.data import pack, readers

    pattern = str(shards / "{00000..00009}.tar")
    with pytest.raises(readers.MissingShards, match=r"8 of 10 shards .*00002\.tar.*--allow-missing"):
        readers.resolve_inputs([pattern])
    assert readers.resolve_inputs([pattern], allow_missing=True) == [str(shards / "00000.tar"),
                                                                     str(shards / "00001.tar")]
    assert pack.main(_pack_argv(shards, shards / "never", pattern)) == 2
    assert "8 of 10 shards" in capsys.readouterr().err and not os.path.exists(shards / "never")


@pytest.mark.parametrize("caption", ["\x00\x00", "\x01\x02\x1b", " \t\n\x0b", "\u200b\x00"])
def test_a_caption_with_no_printable_character_is_skipped_as_empty(shards, caption):
    from oq2vl_jax.data.samples import SampleBuilder, SampleError
    from oq2vl_jax.data.tokenizer import load_tokenizer

    b = SampleBuilder(load_tokenizer(str(shards / "tok")), image_tokens=4)
    with pytest.raises(SampleError, match="empty_caption"):
        b.caption(caption)
    with pytest.raises(SampleError, match="empty_text"):
        b.text(caption)
    assert b.caption("a\x00b").num_images == 1  # printable text around a control character is kept


# -- high-bit-depth images ---------------------------------------------------------------------------


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _cases():
    rng = np.random.default_rng(1)
    g16 = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    i32 = rng.integers(0, 65536, (12, 10)).astype(np.int32)
    big = rng.integers(0, 2**24, (12, 10)).astype(np.int32)
    f01 = rng.random((12, 10), dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, format="PNG")  # a 16-bit greyscale PNG, read back as I;16
    # (bytes or image, the 8-bit greyscale/RGB the pixels must become: a numpy reference)
    return {
        "I;16 png": (buf.getvalue(), np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, -1)),
        "I;16B": (Image.frombytes("I;16B", (10, 12), g16.astype(">u2").tobytes()),
                  np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, -1)),
        "RGB 16-bit png": (_png16_rgb(rgb16), (rgb16 >> 8).astype(np.uint8)),
        "I 16-bit values": (Image.fromarray(i32), np.repeat((i32 // 256).astype(np.uint8)[..., None], 3, -1)),
        "I beyond 16 bits": (Image.fromarray(big), np.repeat(np.rint(big * (255 / big.max())).astype(np.uint8)[..., None],
                                                             3, -1)),
        "F in [0, 1]": (Image.fromarray(f01), np.repeat(np.rint(f01 * 255.0).astype(np.uint8)[..., None], 3, -1)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_high_bit_depth_images_are_scaled_to_8_bits_not_clipped_in_every_path(name):
    from oq2vl_jax.data.readers import prepare_image
    from oq2vl_jax.generate import load_image

    src, want = _cases()[name]
    ref = np.asarray(Image.fromarray(want).resize((16, 16), Image.BICUBIC))
    assert ref.std() > 10  # a clipped (all-white) image would not match
    opened = lambda: Image.open(io.BytesIO(src)) if isinstance(src, bytes) else src  # noqa: E731
    # generate and the packer (stored losslessly here) see the same 8-bit pixels.
    np.testing.assert_allclose(load_image(opened(), 16), (ref / 255.0 - 0.5) / 0.5, atol=1e-6)
    if isinstance(src, bytes):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(prepare_image(src, 16, "png")))), ref)
    from oq2vl_jax.images import to_rgb8

    np.testing.assert_array_equal(np.asarray(to_rgb8(opened())), want)


# -- one named line for what a user can get wrong --------------------------------------------------


def test_a_config_that_is_not_utf8_is_one_named_line(tmp_path, capsys):
    from oq2vl_jax.train import main

    bad = tmp_path / "config.yaml"
    bad.write_bytes(b"model:\n  arch: \xff\xfe\x00binary")
    assert main(["--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and "UTF-8" in err


def test_an_empty_or_broken_tokenizer_folder_is_named(tmp_path, shards, capsys):
    from oq2vl_jax.data import pack
    from oq2vl_jax.data.tokenizer import TokenizerError, load_tokenizer

    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(shards / "tok"):
        data = (shards / "tok" / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2] if name == "tokenizer.json" else data)
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        load_tokenizer(str(broken))
    argv = _pack_argv(shards, tmp_path / "out")
    assert pack.main([*argv[:3], str(tmp_path / "empty"), *argv[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err.split("error: ")[-1] and "holds no tokenizer" in err


def test_generate_arguments_and_images_are_checked_before_the_checkpoint_loads(tmp_path, capsys):
    from oq2vl_jax.generate import main

    missing_run = str(tmp_path / "no-such-run")  # would fail only when loaded: the checks come first
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    for args, fragment in ((["--max-new-tokens", "0"], "--max-new-tokens"), (["--top-p", "0"], "--top-p"),
                           (["--image", str(tmp_path / "gone.png")], "gone.png' not found"),
                           (["--image", str(tmp_path / "bad.png")], "bad.png' cannot be decoded")):
        assert main(["--checkpoint", missing_run, "--prompt", "hi", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert fragment in err and "\n" not in err, err
    assert main(["--checkpoint", missing_run, "--prompt", "hi", "--image", str(tmp_path / "ok.png")]) == 2
    assert "no-such-run" in capsys.readouterr().err


def test_disk_full_is_one_line_with_path_and_free_space(tmp_path):
    from oq2vl_jax import failures
    from oq2vl_jax.metrics import MetricsLogger

    os.symlink("/dev/full", tmp_path / "metrics.jsonl")  # every write: ENOSPC, as on a full disk
    logger = MetricsLogger(str(tmp_path), 10, 0, enabled=True)
    with pytest.raises(failures.DiskFull, match=rf"disk full writing {tmp_path}/metrics.jsonl: [\d.]+ \w+ free"):
        logger.log(1, {"loss": 1.0})
    # Wrapped the way Orbax/TensorStore report it: found in the cause chain.
    with pytest.raises(failures.DiskFull, match="disk full writing /data/ck"):
        with failures.writing("/data/ck"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise RuntimeError("save failed") from e
    with pytest.raises(ZeroDivisionError):  # anything else keeps its traceback
        with failures.writing(str(tmp_path)):
            1 / 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only folder: a read-only tmpfs when we may mount one (root ignores permissions), else chmod."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_a_read_only_workdir_is_one_named_line(read_only_dir, capsys):
    from oq2vl_jax.train import main

    rc = main(["--config", TINY, "--workdir", str(read_only_dir / "run"), "--set", "data.sources=[{path: x}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and str(read_only_dir) in err, err


# -- checkpoints -------------------------------------------------------------------------------------


def _flip_a_bit(step_dir: str) -> str:
    """Flips one bit in the largest params data file (an array's bytes), like a bad disk sector."""
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "params")) for n in ns
             if os.path.basename(r) == "d"]  # OCDBT data files (the rest is metadata)
    target = max(files, key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(target, "wb").write(bytes(data))
    return target


@pytest.mark.parametrize("async_save", [True, False])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_is_used(tmp_path, async_save, caplog):
    import jax.numpy as jnp

    from oq2vl_jax import checkpoint as ckpt
    from oq2vl_jax import integrity

    run = str(tmp_path)
    manifests = integrity.Manifests(ckpt.checkpoint_dir(run), async_save)
    mngr = ckpt.make_manager(run, async_save=async_save, on_finalized=manifests.on_finalized)
    for step in (1, 2, 3):
        manifests.before_save(step)
        ckpt.save(mngr, step, params={"w": jnp.full((256,), float(step))}, meta={"step": step})
        manifests.after_save(step)
    mngr.wait_until_finished()
    assert all(integrity.problem(os.path.join(ckpt.checkpoint_dir(run), str(s))) is None for s in (1, 2, 3))
    _flip_a_bit(os.path.join(ckpt.checkpoint_dir(run), "3"))
    os.remove(os.path.join(ckpt.checkpoint_dir(run), "2", integrity.MANIFEST))  # cut off before its manifest
    # A reader (export, generate, init_from) refuses the damaged one by name.
    with pytest.raises(integrity.CheckpointDamaged, match=r"/3 is damaged: params/.* does not match"):
        ckpt.load_params(run, {"w": jax_struct()}, step=3)
    with caplog.at_level("WARNING", logger="oq2vl_jax.integrity"):
        assert integrity.resume_step(mngr, run) == 1
    assert "checkpoint" in caplog.text and "/3 is damaged" in caplog.text and "/2 is damaged or incomplete" in caplog.text
    assert sorted(mngr.all_steps()) == [1]
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / integrity.DAMAGED_DIR)) == ["2", "3"]
    assert float(ckpt.load_params(run, {"w": jax_struct()})[1]["w"][0]) == 1.0
    mngr.close()


def jax_struct():
    import jax
    import jax.numpy as jnp

    return jax.ShapeDtypeStruct((256,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_when_every_checkpoint_is_damaged_the_resume_stops_and_moves_nothing(tmp_path):
    from oq2vl_jax import integrity

    for s in (1, 2):
        d = tmp_path / "checkpoints" / str(s) / "params"
        d.mkdir(parents=True)
        (d / "data").write_bytes(bytes(range(256)))
        integrity.write_manifest(str(d.parent))
        (d / "data").write_bytes(bytes(range(255)) + b"x")
    with pytest.raises(integrity.CheckpointDamaged, match=r"no intact checkpoint .*2: params/data does not match"):
        integrity.latest_good_step(str(tmp_path), [1, 2], str(tmp_path / "checkpoints"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_checkpoints_saved_before_manifests_existed_are_used_as_they_are(tmp_path):
    from oq2vl_jax import integrity

    for s in (1, 2):
        (tmp_path / "checkpoints" / str(s)).mkdir(parents=True)
    assert integrity.latest_good_step(str(tmp_path), [1, 2], str(tmp_path / "checkpoints")) == 2


# -- metrics -----------------------------------------------------------------------------------------


def test_resume_leaves_metrics_as_one_clean_series_and_keeps_the_old_file(tmp_path):
    from oq2vl_jax.metrics import clean_for_resume

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    lines.insert(3, json.dumps({"step": 3, "eval_loss": 0.5}))
    original = "\n".join(lines) + '\n{"step": 8, "lo'  # a record cut off by a full disk
    (tmp_path / "metrics.jsonl").write_text(original)
    aside = clean_for_resume(str(tmp_path), 5)
    got = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3, 3, 4, 5]
    assert open(aside).read() == original
    with open(tmp_path / "metrics.jsonl", "a") as f:  # the resumed run appends onto a clean line
        f.write(json.dumps({"step": 6, "loss": 0.1}) + "\n")
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 3, 4, 5, 6]
    assert clean_for_resume(str(tmp_path), 6) is None  # already clean: untouched


# -- exports -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shards):
    """A tiny converted checkpoint (HF Qwen2 + SigLIP -> ours)."""
    sys.path.insert(0, os.path.join(REPO, "tools", "convert"))
    import hf_to_jax

    from hf_tiny import hf_qwen2, hf_siglip

    root = tmp_path_factory.mktemp("converted")
    tok = load_tok(shards)
    hf_siglip(image_size=28).save_pretrained(root / "vision")
    hf_qwen2(vocab_size=len(tok) + 8).save_pretrained(root / "llm")
    for name in os.listdir(shards / "tok"):
        (root / "llm" / name).write_bytes((shards / "tok" / name).read_bytes())
    assert hf_to_jax.main(["--vision", str(root / "vision"), "--llm", str(root / "llm"), "--image-tokens", "4",
                           "--out", str(root / "ck")]) == 0
    return root / "ck"


def load_tok(shards):
    from oq2vl_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(str(shards / "tok"))


def test_an_export_never_mixes_with_an_earlier_one_in_its_folder(tmp_path, converted, capsys, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "tools", "convert"))
    import jax_to_hf

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    out = tmp_path / "export"
    argv = ["--checkpoint", str(converted), "--out", str(out), "--format", "qwen2"]
    assert jax_to_hf.main(argv) == 0
    before = sorted(os.listdir(out))
    assert "model.safetensors" in before
    # Into the same folder again, sharded: refused without --overwrite, nothing touched.
    assert jax_to_hf.main([*argv, "--max-shard-size", "20KB"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    assert jax_to_hf.main([*argv, "--max-shard-size", "20KB", "--overwrite"]) == 0
    names = os.listdir(out)
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export")]  # no temp folder or lock left
    # A converted checkpoint carries a manifest too: a flipped bit is named, not exported.
    target = _flip_a_bit(os.path.join(converted, "checkpoints", "0"))
    assert jax_to_hf.main([*argv, "--overwrite"]) != 0
    assert "checkpoints/0 is damaged: params/" in capsys.readouterr().err
    _flip_a_bit(os.path.join(converted, "checkpoints", "0"))  # flipped back
    assert os.path.basename(target) in os.listdir(os.path.dirname(target))


# -- end to end (slow) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from oq2vl_jax.data import pack
    from oq2vl_jax.data.demo import write_demo

    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root), num_samples=512)
    cfg = pack.PackConfig(tokenizer=str(root / "tokenizer"), out=str(root / "packed"), mode="caption",
                          seq_len=128, image_tokens=4, image_size=56, max_images=8)
    pack.run(cfg, [str(root / "shards" / f"{s}.tar") for s in ("00000", "00001", "00002")], log=lambda *a: None)
    return root


STEPS = ["train.steps=8", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0"]


def _sets(demo):
    return [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]", *STEPS]


def _cmd(demo, work):
    return [sys.executable, "-m", "oq2vl_jax.train", "--config", TINY, "--workdir", str(work), "--set", *_sets(demo)]


def _records(work):
    return [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    from oq2vl_jax.config import load_config
    from oq2vl_jax.train import run

    work = tmp_path_factory.mktemp("reference")
    run(load_config(TINY, _sets(demo)), str(work))
    return {r["step"]: r["loss"] for r in _records(work)}


def _start(demo, work, until_records):
    """Starts a trainer; returns once it holds the workdir's lock and has logged `until_records` steps."""
    from oq2vl_jax import locks

    proc = subprocess.Popen(_cmd(demo, work), env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not os.path.exists(work / locks.LOCK_FILE):
        time.sleep(0.01)
    _wait_for_records(proc, work, until_records)
    return proc


def _wait_for_records(proc, work, n):
    deadline = time.time() + 400
    while n and time.time() < deadline and proc.poll() is None:
        if os.path.exists(work / "metrics.jsonl") and len(_records(work)) >= n:
            break
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_0_and_a_flipped_bit_falls_back_resuming_bit_for_bit(demo, reference, tmp_path):
    from oq2vl_jax import checkpoint as ckpt
    from oq2vl_jax import integrity
    from oq2vl_jax.config import load_config
    from oq2vl_jax.train import main

    work = tmp_path / "run"
    proc = _start(demo, work, 0)  # returns once the first trainer holds the lock (before it compiles)
    # A second trainer on the same workdir is refused, naming the first (which compiles meanwhile).
    second = subprocess.run(_cmd(demo, work), env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"PID {proc.pid}" in second.stderr, second.stderr[-2000:]
    assert proc.poll() is None, "the first trainer finished before the second one started: no race tested"
    _wait_for_records(proc, work, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = ckpt.make_manager(str(work), read_only=True).latest_step()
    assert stopped == max(r["step"] for r in _records(work)) < 8 and "SIGINT" in err
    # The latest checkpoint gets a flipped bit; a disk-full cut a record in half.
    _flip_a_bit(os.path.join(ckpt.checkpoint_dir(str(work)), str(stopped)))
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')
    assert main(["--config", TINY, "--workdir", str(work), "--set", *_sets(demo)]) == 0
    got = _records(work)
    assert [r["step"] for r in got] == list(range(1, 9))  # one series: no duplicates, no broken line
    assert all(r["loss"] == reference[r["step"]] for r in got)  # bit for bit
    assert os.listdir(work / integrity.DAMAGED_DIR)
    assert load_config(str(work / "config.yaml")).train.steps == 8


@pytest.mark.slow
def test_disk_full_during_a_run_is_one_named_line_without_a_traceback(demo, reference, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    os.symlink("/dev/full", work / "metrics.jsonl")
    proc = subprocess.run(_cmd(demo, work), env=_env(), capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error")]
    assert proc.returncode == 2 and lines and f"disk full writing {work}/metrics.jsonl" in lines[0], proc.stderr[-3000:]
    assert "free on its file system" in lines[0]
    assert "Traceback" not in proc.stderr
