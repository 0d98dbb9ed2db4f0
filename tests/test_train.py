"""The training job end to end on the tiny config: learning, sharding, resume, multi-process, guards."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

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


def test_loss_decreases_and_fsdp8_equals_one_device(demo, tmp_path):
    from oq2vl_jax.train import run

    run(tiny(demo, "train.steps=30"), str(tmp_path / "fsdp8"))
    sharded = losses(tmp_path / "fsdp8")
    assert len(sharded) == 30
    assert sharded[-5:].mean() < 0.5 * sharded[:3].mean(), sharded
    run(tiny(demo, "train.steps=6", "mesh.fsdp=1"), str(tmp_path / "single"))
    run(tiny(demo, "train.steps=6"), str(tmp_path / "fsdp8_short"))
    np.testing.assert_allclose(losses(tmp_path / "single"), losses(tmp_path / "fsdp8_short"), rtol=1e-4)
    # The final checkpoint holds params, optimiser state, step and the data position; config beside it.
    assert os.path.exists(tmp_path / "fsdp8" / "config.yaml")
    latest = os.path.join(ckpt.checkpoint_dir(str(tmp_path / "fsdp8")), "30")
    assert {"params", "opt_state", "meta", "data"} <= set(os.listdir(latest))


def test_resume_on_fewer_devices_continues_the_run(demo, tmp_path):
    from oq2vl_jax.train import run

    run(tiny(demo, "train.steps=8"), str(tmp_path / "full"))
    run(tiny(demo, "train.steps=8"), str(tmp_path / "split"), stop_at=4)  # saved at 4 on 8 devices
    run(tiny(demo, "train.steps=8", "mesh.fsdp=4"), str(tmp_path / "split"))  # resumed on 4
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))
    for s in range(5, 9):
        np.testing.assert_allclose(split[s]["loss"], full[s]["loss"], rtol=1e-4)


def _train_cmd(workdir, demo, *overrides):
    sets = [f"tokenizer={demo}/tokenizer", f"data.sources=[{{path: {demo}/packed}}]", "train.log_every=1",
            "train.eval_every=0", *overrides]
    return [sys.executable, "-m", "oq2vl_jax.train", "--config", TINY, "--workdir", str(workdir), "--set", *sets]


def _env(devices=8, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=REPO)
    env.update(extra)
    return env


def test_kill_9_then_resume_equals_uninterrupted(demo, tmp_path):
    steps = ["train.steps=12", "train.checkpoint_every=3", "train.async_checkpointing=true"]
    ref = subprocess.run(_train_cmd(tmp_path / "ref", demo, *steps), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    work = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(work, demo, *steps), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = os.path.exists(work / "metrics.jsonl") and max(metrics(work) or [0]) >= 7
        if done:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(metrics(work))
    assert killed_at < 12, "the run finished before it could be killed"
    again = subprocess.run(_train_cmd(work, demo, *steps), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    ref_m, got = metrics(tmp_path / "ref"), metrics(work)
    assert sorted(got) == list(range(1, 13))
    for s in range(1, 13):
        assert got[s]["loss"] == ref_m[s]["loss"], (s, got[s]["loss"], ref_m[s]["loss"])


def test_two_processes_equal_one(demo, tmp_path):
    steps = ["train.steps=4"]
    one = subprocess.run(_train_cmd(tmp_path / "one", demo, *steps), env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(_train_cmd(tmp_path / "two", demo, *steps),
                         env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                  JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # Both processes walk the same global row stream and take their half of each global batch, so
    # the global batches, and hence the losses, are those of the one-process run.
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4)


def test_config_errors_are_named(demo, tmp_path):
    from oq2vl_jax.train import main

    with pytest.raises(ConfigError, match="optim.lrr|lrr"):
        tiny(demo, "optim.lrr=1")
    with pytest.raises(ConfigError, match="train.steps"):
        tiny(demo, "train.steps=ten")
    assert main(["--config", TINY, "--workdir", str(tmp_path), "--set", "data.global_batch_size=12"]) == 2


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(demo, tmp_path):
    from oq2vl_jax.train import NonFiniteLoss, run

    cfg = tiny(demo, "train.steps=10", "train.checkpoint_every=1", "optim.lr=1e30", "optim.warmup_ratio=0.0",
               "optim.clip_grad_norm=0.0")
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+)") as err:
        run(cfg, str(tmp_path))
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    mngr = ckpt.make_manager(str(tmp_path), read_only=True)
    assert mngr.latest_step() == bad - 1
