"""Training metrics: a progress bar, a log line, WORKDIR/metrics.jsonl and TensorBoard (main process)."""

from __future__ import annotations

import json
import math
import os

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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
