"""One config for pack and train: settings derived from the tokenizer and the packed data, values that
contradict them refused by name, and a step that cannot fit the device named with its knobs."""

import json
import os

import pytest

from oq2vl_jax import memory, resolve
from oq2vl_jax.config import ConfigError, load_config
from oq2vl_jax.data import pack
from oq2vl_jax.data.demo import write_demo
from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo shards packed by `pack --config configs/tiny.yaml`: the packer reads the training config."""
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root), num_samples=300)  # 128 a shard: 00000-00002
    for out, shards in (("packed", "{00000..00001}"), ("packed_eval", "00002")):
        rc = pack.main(["--config", TINY, "--input", str(root / "shards" / f"{shards}.tar"), "--out",
                        str(root / out), "--set", f"tokenizer={root / 'tokenizer'}"])
        assert rc == 0
    return root


def _cfg(demo, *overrides):
    base = [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]",
            f"data.eval_source={demo}/packed_eval"]
    return load_config(TINY, base + list(overrides))


def test_pack_reads_seq_len_image_settings_and_tokenizer_from_the_config(demo):
    stats = json.load(open(demo / "packed" / "stats.json"))
    cfg = load_config(TINY)
    assert (stats["seq_len"], stats["image_tokens"], stats["image_size"], stats["max_images"]) == (
        cfg.data.seq_len, cfg.model.image_tokens, cfg.model.vision.image_size, cfg.data.max_images)
    ids = special_ids(load_tokenizer(str(demo / "tokenizer")))
    assert stats["tokenizer"]["image_token_id"] == ids.image and stats["tokenizer"]["vocab_len"] == ids.vocab_len


def test_unset_settings_come_from_the_tokenizer_and_the_packed_stats(demo):
    cfg = _cfg(demo, "data.seq_len=null", "data.max_images=null", "model.image_tokens=null")
    assert cfg.model.image_token_id is None and cfg.model.text.vocab_size is None
    got = resolve.for_train(cfg, 1, 8)
    stats = [json.load(open(demo / d / "stats.json")) for d in ("packed", "packed_eval")]
    ids = special_ids(load_tokenizer(str(demo / "tokenizer")))
    assert got.model.image_token_id == ids.image
    assert got.model.text.vocab_size == resolve.round_vocab(ids.vocab_len, 1) >= ids.vocab_len
    assert got.model.text.vocab_size % 128 == 0
    assert got.data.seq_len == stats[0]["seq_len"] and got.model.image_tokens == stats[0]["image_tokens"]
    assert got.data.max_images == max(s["max_images_in_row"] for s in stats)
    assert got.model.max_segments == max(s["max_samples_in_row"] for s in stats)


def test_vocabulary_rounds_up_to_split_over_the_tensor_axis():
    assert resolve.round_vocab(151_665, 1) == 151_680
    assert resolve.round_vocab(151_665, 4) == 152_064
    assert resolve.round_vocab(512, 2) == 512


def test_a_set_value_that_contradicts_the_data_is_refused_by_name(demo):
    with pytest.raises(ConfigError, match="model.image_token_id=3 but the tokenizer"):
        resolve.for_train(_cfg(demo, "model.image_token_id=3"), 1, 8)
    with pytest.raises(ConfigError, match="packed with seq_len=128, data.seq_len=256"):
        resolve.for_train(_cfg(demo, "data.seq_len=256"), 1, 8)
    with pytest.raises(ConfigError, match=r"vocab_size=64 < tokenizer size"):
        resolve.for_train(_cfg(demo, "model.text.vocab_size=64"), 1, 8)
    with pytest.raises(ConfigError, match="data.max_images=1"):
        resolve.for_train(_cfg(demo, "data.max_images=1"), 1, 8)
    # A value set to what the data say is kept as it is.
    assert resolve.for_train(_cfg(demo, "model.text.vocab_size=1024"), 1, 8).model.text.vocab_size == 1024


def test_sources_packed_differently_are_refused(demo, tmp_path):
    other = tmp_path / "other"
    assert pack.main(["--config", TINY, "--input", str(demo / "shards" / "00000.tar"), "--out", str(other),
                      "--seq-len", "64", "--set", f"tokenizer={demo}/tokenizer"]) == 0
    cfg = _cfg(demo, "data.seq_len=null", f"data.sources=[{{path: {demo}/packed}}, {{path: {other}}}]")
    with pytest.raises(ConfigError, match="the data sources disagree on seq_len"):
        resolve.for_train(cfg, 1, 8)


def test_pack_refuses_rows_too_short_for_one_image(demo, tmp_path, capsys):
    rc = pack.main(["--config", TINY, "--input", str(demo / "shards" / "00000.tar"), "--out", str(tmp_path / "o"),
                    "--image-tokens", "144", "--image-size", "384", "--set", f"tokenizer={demo}/tokenizer"])
    assert rc == 2 and "set data.seq_len >= 147" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_step_that_does_not_fit_the_device_exits_2_naming_the_knobs(demo, tmp_path, capsys, monkeypatch):
    from oq2vl_jax.train import main

    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 20)  # a 1 MiB device
    argv = ["--config", TINY, "--workdir", str(tmp_path), "--set", f"tokenizer={demo}/tokenizer",
            f"data.sources=[{{path: {demo}/packed}}]", "train.eval_every=0", "train.steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "GiB per device, the device has 0.00 GiB" in err
    for knob in ("train.micro_batches", "model.remat", "model.loss_chunk_size", "model.vision_chunk_size"):
        assert knob in err
    assert len(err.strip().splitlines()) == 1


def test_out_of_memory_at_run_time_is_named_not_a_traceback(demo, tmp_path, capsys, monkeypatch):
    from oq2vl_jax import train

    def exhausted(self, state, batch):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 33458577320 bytes.")

    monkeypatch.setattr(train.Trainer, "step", exhausted)
    argv = ["--config", TINY, "--workdir", str(tmp_path), "--set", f"tokenizer={demo}/tokenizer",
            f"data.sources=[{{path: {demo}/packed}}]", "train.eval_every=0", "train.steps=2"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "ran out of device memory" in err and "model.loss_chunk_size" in err
