"""configs/qwen2vl_tiny.yaml end to end on the demo data: the loss falls; FSDP over 8 devices equals
one device; a run stopped and resumed equals the uninterrupted one (heavier: marked slow)."""

import json
import os

import numpy as np
import pytest

from oq2vl_jax.config import load_config
from oq2vl_jax.data import pack
from oq2vl_jax.data.demo import write_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "qwen2vl_tiny.yaml")
PACK = dict(mode="qwen2vl_caption", seq_len=128, max_pixels=12544, max_patches=192)
STEPS = ["train.steps=12", "train.checkpoint_every=4", "train.log_every=1", "train.eval_every=0"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root), num_samples=512)  # the ids configs/qwen2vl_tiny.yaml names
    for name, shards in (("packed_qwen2vl", ["00000"]), ("packed_qwen2vl_eval", ["00001"])):
        cfg = pack.PackConfig(tokenizer=str(root / "tokenizer_qwen2vl"), out=str(root / name), **PACK)
        pack.run(cfg, [str(root / "shards" / f"{s}.tar") for s in shards], log=lambda *a: None)
    return root


def _cfg(demo, *overrides):
    return load_config(CONFIG, [f"tokenizer={demo}/tokenizer_qwen2vl", f"data.sources=[{{path: {demo}/packed_qwen2vl}}]",
                                f"data.eval_source={demo}/packed_qwen2vl_eval", *STEPS, *overrides])


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return np.array([out[s] for s in sorted(out)])


def test_qwen2vl_tiny_learns_shards_and_resumes(demo, tmp_path):
    from oq2vl_jax.train import run

    ref = tmp_path / "fsdp8"
    run(_cfg(demo), str(ref))
    got = _losses(ref)
    assert len(got) == 12 and got[-3:].mean() < 0.7 * got[:2].mean(), got

    one = tmp_path / "one"
    run(_cfg(demo, "mesh.fsdp=1"), str(one), stop_at=4)
    np.testing.assert_allclose(_losses(one), got[:4], rtol=1e-4)
    run(_cfg(demo, "mesh.fsdp=1"), str(one), stop_at=4)  # resumed from its step-4 checkpoint
    np.testing.assert_allclose(_losses(one), got[:8], rtol=1e-4)
