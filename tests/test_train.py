"""The training job end to end on the tiny config: learning, sharding, resume, multi-process, guards."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from oq2vl_jax import checkpoint as ckpt
from oq2vl_jax.config import ConfigError, load_config
from oq2vl_jax.data import pack
from oq2vl_jax.data.demo import write_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo shards packed as configs/tiny.yaml expects (train and held-out splits)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root), num_samples=512)
    for name, shards in (("packed", ["00000", "00001", "00002"]), ("packed_eval", ["00003"])):
        cfg = pack.PackConfig(tokenizer=str(root / "tokenizer"), out=str(root / name), mode="caption",
                              seq_len=128, image_tokens=4, image_size=56, max_images=8)
        pack.run(cfg, [str(root / "shards" / f"{s}.tar") for s in shards], log=lambda *a: None)
    return root


def tiny(demo, *overrides):
    base = [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]",
            f"data.eval_source={demo}/packed_eval", "train.log_every=1", "train.eval_every=0"]
    return load_config(TINY, base + list(overrides))


def metrics(workdir):
    """{step: record}; a step logged twice (before a crash and after the resume) keeps the last."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r
    return out


def losses(workdir):
    m = metrics(workdir)
    return np.array([m[s]["loss"] for s in sorted(m)])


STEPS = ["train.steps=20", "train.checkpoint_every=3", "train.keep_last=2", "train.keep_every=6"]


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """One uninterrupted 20-step run on 8 devices (fsdp=8): the run the others must reproduce."""
    from oq2vl_jax.train import run

    workdir = tmp_path_factory.mktemp("reference")
    run(tiny(demo, *STEPS), str(workdir))
    return workdir


def test_loss_decreases_and_checkpoint_is_complete(reference):
    got = losses(reference)
    assert len(got) == 20
    assert got[-5:].mean() < 0.6 * got[:3].mean(), got
    # The final checkpoint holds params, optimiser state, step and the data position; config beside it.
    assert os.path.exists(reference / "config.yaml")
    latest = os.path.join(ckpt.checkpoint_dir(str(reference)), "20")
    assert {"params", "opt_state", "meta", "data"} <= set(os.listdir(latest))
    # Saved every 3 steps and at the end; kept: the last 2 plus every 6th.
    assert sorted(ckpt.make_manager(str(reference), read_only=True).all_steps()) == [6, 12, 18, 20]
    assert os.listdir(reference / "tensorboard")
    assert all(0 <= r["data_wait"] <= 1 for r in metrics(reference).values())
    assert all(r["mfu"] is None for r in metrics(reference).values())  # a CPU has no known peak: n/a


def test_one_device_equals_fsdp8(demo, reference, tmp_path):
    from oq2vl_jax.train import run

    run(tiny(demo, *STEPS, "mesh.fsdp=1", "train.profile_steps=[2, 3]", "train.peak_tflops=0.5"), str(tmp_path),
        stop_at=5)
    np.testing.assert_allclose(losses(tmp_path), losses(reference)[:5], rtol=1e-4)
    assert all(r["mfu"] > 0 for r in metrics(tmp_path).values())  # a configured peak gives MFU on any device
    # A profiled run is the same run; its trace is in WORKDIR/profile.
    assert any(f.endswith(".xplane.pb") for _, _, fs in os.walk(tmp_path / "profile") for f in fs)


def test_resume_on_fewer_devices_continues_the_run(demo, reference, tmp_path):
    from oq2vl_jax.train import run

    run(tiny(demo, *STEPS), str(tmp_path), stop_at=4)  # saved at step 4 from 8 devices
    run(tiny(demo, *STEPS, "mesh.fsdp=4"), str(tmp_path), stop_at=4)  # resumed on 4 devices: 4 more
    got, ref = metrics(tmp_path), metrics(reference)
    assert sorted(got) == list(range(1, 9))
    for s in range(5, 9):
        np.testing.assert_allclose(got[s]["loss"], ref[s]["loss"], rtol=1e-4)


def _train_cmd(workdir, demo, *overrides):
    sets = [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]", "train.log_every=1",
            "train.eval_every=0", *overrides]
    return [sys.executable, "-m", "oq2vl_jax.train", "--config", TINY, "--workdir", str(workdir), "--set", *sets]


def _env(devices=8, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=REPO)
    env.update(extra)
    return env


def _run_until(cmd, work, min_step, sig):
    """Starts a training process, sends `sig` once metrics reach `min_step`; returns the process."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(work / "metrics.jsonl") and max(metrics(work) or [0]) >= min_step:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def test_sigterm_and_kill_9_then_resume_equals_uninterrupted(demo, reference, tmp_path):
    work = tmp_path / "run"
    cmd = _train_cmd(work, demo, *STEPS)
    # SIGTERM: the step in flight finishes, is saved (even off the checkpoint interval), clean exit.
    term = _run_until(cmd, work, 4, signal.SIGTERM)
    assert term.returncode == 0, term.stderr.read()[-3000:]
    stopped = max(metrics(work))
    assert stopped < 20 and ckpt.make_manager(str(work), read_only=True).latest_step() == stopped
    # SIGKILL mid-run: whatever was in flight (maybe a half-written checkpoint) is lost, not resumed.
    killed = _run_until(cmd, work, stopped + 4, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and max(metrics(work)) < 20
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    ref, got = metrics(reference), metrics(work)
    assert sorted(got) == list(range(1, 21))
    for s in range(1, 21):  # same mesh: bit-identical
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])


@pytest.mark.slow  # default-suite time (about 10 minutes on 2 cores); run with -m slow
def test_two_processes_equal_one(demo, reference, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = _train_cmd(tmp_path, demo, *STEPS) + ["--stop-at", "5"]
    procs = [
        subprocess.Popen(cmd, env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # Both processes walk the same global row stream and take their half of each global batch, so
    # the global batches, and hence the losses, are those of the one-process run.
    np.testing.assert_allclose(losses(tmp_path), losses(reference)[:5], rtol=1e-4)


def test_init_from_a_converted_hf_checkpoint(demo, tmp_path):
    """hf_to_jax output (tiny HF SigLIP + Qwen2 with the tiny config's shapes) is what training starts from."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from oq2vl_jax.train import Trainer

    sys.path.insert(0, os.path.join(REPO, "tools", "convert"))
    import hf_to_jax

    from oq2vl_jax import resolve

    cfg = resolve.for_train(tiny(demo), 1, jax.device_count())  # the vocabulary the tokenizer gives
    v, t = cfg.model.vision, cfg.model.text
    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="gelu", vision_use_head=False))
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rope_theta=t.rope_theta, tie_word_embeddings=True))
    vision.save_pretrained(tmp_path / "siglip")
    llm.save_pretrained(tmp_path / "qwen2")
    assert hf_to_jax.main(["--vision", str(tmp_path / "siglip"), "--llm", str(tmp_path / "qwen2"),
                           "--tokenizer", f"{demo}/tokenizer", "--image-tokens", "4",
                           "--out", str(tmp_path / "converted")]) == 0
    cfg = resolve.for_train(tiny(demo, f"train.init_from={tmp_path / 'converted'}"), 1, jax.device_count())
    trainer = Trainer(cfg, str(tmp_path / "run"))
    state, step = trainer.initial_state(data_iter=None)
    assert step == 0
    got = np.asarray(state["params"]["language_model"]["model"]["layers"][1]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_array_equal(got, llm.model.layers[1].mlp.up_proj.weight.detach().numpy().T)
    got = np.asarray(state["frozen"]["vision_tower"]["encoder"]["layers"][0]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(got, vision.encoder.layers[0].self_attn.q_proj.weight.detach().numpy().T)
    trainer.mngr.close()


def test_config_errors_are_named(demo, tmp_path, capsys):
    from oq2vl_jax.train import main

    with pytest.raises(ConfigError, match="optim.lrr|lrr"):
        tiny(demo, "optim.lrr=1")
    with pytest.raises(ConfigError, match="train.steps"):
        tiny(demo, "train.steps=ten")
    ok = [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]", "train.eval_every=0"]
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "data.global_batch_size=12"]) == 2
    assert "global_batch_size=12" in capsys.readouterr().err
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "train.micro_batches=4"]) == 2
    assert "4 rows per micro-batch do not split over mesh data x fsdp = 8 devices; e.g. train.micro_batches=2" \
        in capsys.readouterr().err
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", "tokenizer=/nonexistent"]) == 2
    assert "/nonexistent" in capsys.readouterr().err
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", f"tokenizer={demo}/tokenizer",
                 "data.sources=[{path: /no/such/data}]"]) == 2
    assert "/no/such/data" in capsys.readouterr().err
    # cuDNN's packed layout would drop samples past max_segments: refused from the packer's stats.
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "model.attention=cudnn",
                 "model.max_segments=4"]) == 2
    assert "model.max_segments=4" in capsys.readouterr().err
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "train.loss_reduction=micro_batch_mean",
                 "train.loss_group_rows=3"]) == 2
    assert "train.loss_group_rows=3 does not divide" in capsys.readouterr().err


@pytest.mark.slow  # default-suite time (about 10 minutes on 2 cores); run with -m slow
def test_resume_refuses_a_different_data_layout(demo, tmp_path):
    from oq2vl_jax.train import run

    run(tiny(demo, *STEPS), str(tmp_path), stop_at=1)
    with pytest.raises(ConfigError, match=r"\(batch_size differ\)"):
        run(tiny(demo, *STEPS, "data.global_batch_size=32"), str(tmp_path))
    with pytest.raises(ConfigError, match="'num_workers': 1"):
        run(tiny(demo, *STEPS, "data.num_workers=1"), str(tmp_path))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(demo, tmp_path):
    from oq2vl_jax.train import NonFiniteLoss, run

    cfg = tiny(demo, "train.steps=10", "train.checkpoint_every=1", "optim.lr=1e30", "optim.warmup_ratio=0.0",
               "optim.clip_grad_norm=0.0")
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+)") as err:
        run(cfg, str(tmp_path))
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    mngr = ckpt.make_manager(str(tmp_path), read_only=True)
    assert mngr.latest_step() == bad - 1


def test_steps_are_traced_inside_the_mesh(tmp_path):
    """The model's activation sharding constraints (sharding.constrain, a no-op outside a mesh) are
    part of the compiled train step."""
    from oq2vl_jax.train import Trainer
    from oq2vl_jax.train_step import MODEL_KEYS, batch_shardings

    cfg = load_config(TINY, ["data.global_batch_size=8", "train.micro_batches=1", "tokenizer=null",
                             "model.text.vocab_size=512", "model.image_token_id=386"])
    trainer = Trainer(cfg, str(tmp_path))
    m, t, size = cfg.data.max_images, cfg.data.seq_len, cfg.model.vision.image_size
    shapes = {"input_ids": (1, 8, t), "segment_ids": (1, 8, t), "positions": (1, 8, t), "loss_mask": (1, 8, t),
              "images": (1, 8, m, size, size, 3)}
    example = {k: np.zeros(s, np.uint8 if k == "images" else np.int32) for k, s in shapes.items()}
    shardings = batch_shardings(trainer.mesh, example, True)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in example.items()}
    assert set(batch) == set(MODEL_KEYS[:5])  # every key the oq2vl model reads (the rest: qwen2_vl patch rows)
    hlo = trainer.train_step.lower(trainer.abstract_state, batch).as_text()
    assert hlo.count("sharding_constraint") >= cfg.model.vision.num_hidden_layers
    trainer.mngr.close()


def test_bad_eval_source_fails_at_start_up(demo, tmp_path, capsys):
    from oq2vl_jax.train import main

    ok = [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]", "train.eval_every=3"]
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "data.eval_source=/no/eval"]) == 2
    assert "/no/eval" in capsys.readouterr().err
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "data.eval_source=null"]) == 2
    assert "train.eval_every=3 needs data.eval_source" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_refused_resume_keeps_config_and_names_the_parameter(demo, tmp_path, capsys):
    from oq2vl_jax.train import main, run

    run(tiny(demo, *STEPS), str(tmp_path), stop_at=1)
    saved = (tmp_path / "config.yaml").read_text()
    argv = ["--config", TINY, "--workdir", str(tmp_path), "--set", f"tokenizer={demo}/tokenizer",
            f"data.sources=[{{path: {demo}/packed}}]", "train.eval_every=0", *STEPS]
    assert main([*argv, "model.text.num_hidden_layers=3"]) == 2
    assert "missing language_model.model.layers.2." in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == saved  # generate/export still read the right model
    assert main([*argv, "model.text.intermediate_size=40"]) == 2
    assert "layers.1.mlp.gate_proj.kernel saved (64, 256), model (64, 40)" in capsys.readouterr().err


@pytest.mark.slow  # default-suite time (about 10 minutes on 2 cores); run with -m slow
def test_checkpoint_is_saved_before_a_failing_eval(demo, tmp_path, monkeypatch):
    from oq2vl_jax import train

    def broken(self, state):
        raise OSError("eval data went away")

    monkeypatch.setattr(train.Trainer, "evaluate", broken)
    with pytest.raises(OSError, match="went away"):
        train.run(tiny(demo, "train.steps=10", "train.checkpoint_every=3", "train.eval_every=3"), str(tmp_path))
    assert ckpt.make_manager(str(tmp_path), read_only=True).latest_step() == 3


def test_a_partial_save_left_by_a_kill_is_removed(tmp_path):
    mngr = ckpt.make_manager(str(tmp_path), async_save=False)
    ckpt.save(mngr, 3, params={"w": np.ones(4, np.float32)})
    mngr.close()
    # What a save killed mid-way leaves (Orbax writes STEP.orbax-checkpoint-tmp-*, renamed when done):
    # never resumed from, and removed by the next run (in the background; its first save waits for it).
    partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    assert ckpt.make_manager(str(tmp_path), read_only=True).latest_step() == 3 and partial.exists()
    mngr = ckpt.make_manager(str(tmp_path))
    assert mngr.latest_step() == 3
    ckpt.save(mngr, 4, params={"w": np.ones(4, np.float32)})
    mngr.wait_until_finished()
    mngr.close()
    assert not partial.exists()


def test_text_only_run_with_no_image_slots(demo, tmp_path):
    """A text stage reads text rows with data.max_images: 0 (what `pack --mode text` records): the
    batches carry no image slots, and training and eval run on them."""
    from oq2vl_jax.train import run

    text = str(tmp_path / "text")
    pack.run(pack.PackConfig(tokenizer=str(demo / "tokenizer"), out=text, mode="text", seq_len=128),
             [str(demo / "text" / "text.jsonl")], log=lambda *a: None)
    cfg = tiny(demo, f"data.sources=[{{path: {text}}}]", f"data.eval_source={text}", "data.max_images=0",
               "train.steps=1", "train.micro_batches=1", "train.eval_every=1", "train.eval_batches=1")
    run(cfg, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        got = [json.loads(line) for line in f]
    assert np.isfinite(got[0]["loss"]) and np.isfinite(got[1]["eval_loss"])


def test_continued_schedule_must_lie_inside_its_curve(demo, tmp_path):
    """Past the end of the curve the lr is lr x final_lr_ratio (0): a schedule_offset without
    schedule_steps, or a run longer than what is left of the curve, would train at lr 0."""
    from oq2vl_jax.train import run

    with pytest.raises(ConfigError, match="optim.schedule_offset=40 needs optim.schedule_steps"):
        run(tiny(demo, "train.steps=10", "optim.schedule_offset=40"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"schedule_offset=40 \+ train.steps=10 runs past optim.schedule_steps=45"):
        run(tiny(demo, "train.steps=10", "optim.schedule_offset=40", "optim.schedule_steps=45"), str(tmp_path))
    assert not os.path.exists(tmp_path / "config.yaml")


def test_packed_data_that_disagree_with_the_config_are_a_config_error(demo, tmp_path, capsys):
    from oq2vl_jax.train import main

    ok = [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]", "train.eval_every=0"]
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "model.image_tokens=16"]) == 2
    assert "repack with model.image_tokens=16" in capsys.readouterr().err
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "data.mode=unpacked_sft"]) == 2
    assert "mode='unpacked_sft' needs rows packed with pack.packing=none" in capsys.readouterr().err
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", *ok, "data.alpha=drop"]) == 2
    assert "alpha: packed 'white', config 'drop'" in capsys.readouterr().err
