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


STEPS = ["train.steps=20", "train.checkpoint_every=3"]


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


def test_one_device_equals_fsdp8(demo, reference, tmp_path):
    from oq2vl_jax.train import run

    run(tiny(demo, *STEPS, "mesh.fsdp=1"), str(tmp_path), stop_at=5)
    np.testing.assert_allclose(losses(tmp_path), losses(reference)[:5], rtol=1e-4)


def test_resume_on_fewer_devices_continues_the_run(demo, reference, tmp_path):
    from oq2vl_jax.train import run

    run(tiny(demo, *STEPS), str(tmp_path), stop_at=4)  # saved at step 4 from 8 devices
    run(tiny(demo, *STEPS, "mesh.fsdp=4"), str(tmp_path), stop_at=8)  # resumed on 4 devices
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


def test_kill_9_then_resume_equals_uninterrupted(demo, reference, tmp_path):
    work = tmp_path / "killed"
    cmd = _train_cmd(work, demo, *STEPS)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(work / "metrics.jsonl") and max(metrics(work) or [0]) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(metrics(work)) < 20, "the run finished before it could be killed"
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    ref, got = metrics(reference), metrics(work)
    assert sorted(got) == list(range(1, 21))
    for s in range(1, 21):  # same mesh: bit-identical
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])


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
