"""The README's commands are the real ones: the main job block runs as written, and CI runs the test line."""

import json
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"```bash\n(.*?)```", f.read(), re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = _blocks()[1].strip()
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert test_cmd in f.read()


def test_readme_main_job_trains_on_the_demo_data(tmp_path):
    """Runs the first block minus the venv/pip set-up, in a scratch directory, with this interpreter."""
    lines = [ln.strip().rstrip("\\").strip() for ln in _blocks()[0].splitlines()]
    lines = [ln.removeprefix("&& ").strip() for ln in lines if ln and not ln.startswith("#")]
    job = [ln for ln in lines if ln.startswith("python -m oq2vl_jax.")]
    assert job and job[-1].startswith("python -m oq2vl_jax.train"), lines
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    for cmd in job:
        cmd = cmd.replace("python ", f"{sys.executable} ", 1)
        out = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stderr[-3000:])
    with open(tmp_path / "runs" / "tiny" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert train[-1] < 0.25 * train[0], train  # clearly falling
    assert evals and evals[-1] < evals[0]
    assert os.path.isdir(tmp_path / "runs" / "tiny" / "checkpoints" / "150")
