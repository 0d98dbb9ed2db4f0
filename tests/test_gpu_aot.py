"""bench/gpu_aot.py: the shipped pre-training step, compiled for 8 H100s on a machine without a GPU,
fits an H100 with a 10% margin and runs every attention as cuDNN flash attention.

Needs jax's CUDA plugin (Python 3.12: `pip install -e . 'jax[cuda12]' pytest`, no GPU needed); skipped
without it. Slow (a full-size XLA GPU compile, about 3 minutes on 2 cores):

    python -m pytest -q -m slow tests/test_gpu_aot.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def aot(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}  # conftest's CPU setup
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_aot.py"), *args, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return proc, (json.loads(out.read_text()) if out.exists() else [])


needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                       reason="needs jax's CUDA plugin: pip install 'jax[cuda12]' (Python 3.12)")


@pytest.mark.slow
@needs_cuda_plugin
def test_pretrain_step_compiled_for_eight_h100s_fits_and_all_attention_is_cudnn(tmp_path):
    proc, reports = aot(tmp_path, "--config", "configs/pretrain.yaml", "--gpu", "h100", "--topology", "1x1x8",
                        "--steps", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = reports
    assert r["devices"] == 8 and "H100" in r["gpu"]
    assert r["fits"], r["memory_gib"]
    assert r["memory_gib"]["total"] <= 0.9 * r["memory_gib"]["device"]
    got, want = r["cudnn_attention"], r["cudnn_attention_expected"]
    assert (got["forward"], got["backward"]) == (want["forward"], want["backward"]), (got, want)
    assert want["backward"] == 28 * r["micro_batches"]  # every LLM layer, every micro-batch
    assert not [a for a in r["xla_attention"] if a["kind"] == "dense mask"], r["xla_attention"]
    assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["reduce-scatter"]["count"] > 0
    assert 0 < r["roofline"]["mfu_upper_bound"] < 1
    assert "predicted" in proc.stdout and "fits" in proc.stdout


@needs_cuda_plugin
def test_a_bad_topology_is_one_line_and_exit_2(tmp_path):
    proc, _ = aot(tmp_path, "--config", "configs/pretrain.yaml", "--topology", "8gpus", "--steps", "train")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --topology")
    assert len(proc.stderr.strip().splitlines()) == 1


TINY_BF16 = ["--set", "data.global_batch_size=16", "train.micro_batches=1", "model.attention=cudnn",
             "model.dtype=bfloat16", "model.text.vocab_size=1024", "model.image_token_id=5", "model.image_tokens=4",
             "data.seq_len=256"]


@needs_cuda_plugin
def test_tiny_steps_compile_and_count_what_the_model_asks_for(tmp_path):
    """The tiny config in bf16 (its tower stays f32, so XLA attention by the model's own rule):
    train, prefill and decode compile; generation's cached attention is the dense-mask path."""
    proc, reports = aot(tmp_path, "--config", "configs/tiny.yaml", *TINY_BF16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, prefill, decode = reports
    assert [r["step"] for r in reports] == ["train", "prefill", "decode"]
    for r in reports:
        got, want = r["cudnn_attention"], r["cudnn_attention_expected"]
        assert (got["forward"], got["backward"]) == (want["forward"], want["backward"]), r["step"]
    assert (train["cudnn_attention"]["forward"], train["cudnn_attention"]["backward"]) == (2, 2)  # 2 layers, no remat
    assert {a["kind"] for a in train["xla_attention"]} == {"XLA, no mask"}  # the f32 tower
    assert "dense mask" in {a["kind"] for a in decode["xla_attention"]}
    assert train["devices"] == 8 and prefill["devices"] == decode["devices"] == 1
    assert train["collectives"]["reduce-scatter"]["count"] >= 1


@needs_cuda_plugin
def test_qwen2_vl_steps_compile_with_its_packed_patch_rows(tmp_path):
    """Qwen2-VL's train step and generation compile; its tower's packed patch rows take XLA's dense-mask
    attention (no cuDNN path for them), which the report names."""
    proc, reports = aot(tmp_path, "--config", "configs/qwen2vl_tiny.yaml", "--set", "model.text.vocab_size=1024",
                        "model.image_token_id=5", "--image-grid", "8", "8", "--gen-batch", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in reports] == ["train", "prefill", "decode"]
    train, prefill, _ = reports
    assert any(a["kind"] == "dense mask" and a["q"][1] == 192 for a in train["xla_attention"])  # 192-patch rows
    assert any(a["kind"] == "dense mask" and a["q"][1] == 64 for a in prefill["xla_attention"])  # one 8x8 image
