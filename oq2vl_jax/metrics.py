"""Training metrics: a progress bar, a log line, WORKDIR/metrics.jsonl and TensorBoard (main process)."""

from __future__ import annotations

import json
import math
import os

from tqdm import tqdm

from oq2vl_jax import failures


class MetricsLogger:
    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.jsonl = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional: the jsonl file is the record
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=None)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{prefix + k: _plain(v) for k, v in metrics.items()}}
        with failures.writing(self.path):  # a full disk: one line naming this file
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in record.items() if k != "step"]
        self.bar.write(" | ".join(parts))
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            with failures.writing(self.path):
                self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _fmt(v) -> str:
    if v is None:  # a figure that cannot be computed here (e.g. MFU on a device of unknown peak)
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def clean_for_resume(workdir: str, step: int) -> str | None:
    """Leaves WORKDIR/metrics.jsonl as one series up to `step` (the restored checkpoint's step).

    Drops a partial (unparseable) line, e.g. one cut off by a full disk or a kill, and every record
    after `step`, which the resumed run logs again. When anything is dropped, the file as it was is
    kept as metrics.jsonl.before-resume-<step>[-n]; returns that path (None if nothing changed)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):  # absent, or not a regular file (a pipe or device: left alone)
        return None
    with open(path, "rb") as f:
        raw = f.read()
    kept, dropped = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        except ValueError:
            keep = False
        if keep:
            kept.append(line + b"\n")
        else:
            dropped += 1
    if not dropped and (not raw or raw.endswith(b"\n")):
        return None
    aside = f"{path}.before-resume-{step}"
    n = 1
    while os.path.exists(aside):
        aside, n = f"{path}.before-resume-{step}-{n}", n + 1
    with open(path + ".tmp", "wb") as f:
        f.writelines(kept)
    os.replace(path, aside)
    os.replace(path + ".tmp", path)
    return aside
