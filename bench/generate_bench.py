"""Throughput of batched KV-cache generation at a config's full size: prefill and decode tokens/s.

    python bench/generate_bench.py --config configs/sft.yaml --batch 8 --max-new-tokens 128
    python bench/generate_bench.py --config configs/pretrain.yaml --set model.param_dtype=bfloat16

The model is randomly initialised (the shapes, not the weights, set the speed) on one device. Each
request is [<s>, `--images` x image_tokens image slots, `--prompt-tokens` random text tokens] with
random pixels; generation runs the real `Generator` (jitted prefill, then the on-device decode loop)
with no stop tokens, so every row produces exactly `--max-new-tokens`. The first call compiles; the
figures are from a second, timed call (compile time is reported apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import numpy as np

from oq2vl_jax.config import load_config
from oq2vl_jax.generate import Generator, Prompt
from oq2vl_jax.models import build_sharded, count_params
from oq2vl_jax.sharding import make_mesh


def synthetic_prompts(model_cfg, n: int, images: int, prompt_tokens: int, seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    size, k = model_cfg.vision.image_size, model_cfg.image_tokens
    text_vocab = min(model_cfg.text.vocab_size, model_cfg.image_token_id)  # never draw the image id
    prompts = []
    for _ in range(n):
        ids = [1] + [model_cfg.image_token_id] * (images * k) + rng.integers(2, text_vocab, prompt_tokens).tolist()
        pix = rng.uniform(-1, 1, (images, size, size, 3)).astype(np.float32) if images else None
        prompts.append(Prompt(ids, pix))
    return prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/sft.yaml")
    p.add_argument("--batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--prompt-tokens", type=int, default=32, help="text tokens per request after the images")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    args = p.parse_args(argv)

    cfg = load_config(args.config, ["train.init_from=null", "tokenizer=null"] + args.set)
    model_cfg = dataclasses.replace(cfg.model, remat="none")  # inference: nothing to recompute
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    model = build_sharded(model_cfg, mesh)
    jax.block_until_ready(jax.tree.leaves(model))
    init_s = time.perf_counter() - t0

    gen = Generator(model, pad_id=0, stop_ids=(), pad_multiple=32)
    prompts = synthetic_prompts(model_cfg, args.batch, args.images, args.prompt_tokens)
    kwargs = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    gen(prompts, **kwargs)  # compiles prefill and the decode loop
    compile_s = gen.stats.compile_s
    gen.stats = type(gen.stats)()
    t0 = time.perf_counter()
    out = gen(prompts, **kwargs)
    wall_s = time.perf_counter() - t0
    s = gen.stats
    assert s.compile_s == 0 and all(len(o) == args.max_new_tokens for o in out)

    mem = jax.devices()[0].memory_stats() or {}
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "config": args.config, "params": count_params(model),
        "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype, "batch": args.batch,
        "images_per_request": args.images, "prompt_tokens_per_request": len(prompts[0].ids),
        "max_new_tokens": args.max_new_tokens,
        "prefill_s": round(s.prefill_s, 3), "prefill_tokens_per_s": round(s.prompt_tokens / s.prefill_s, 1),
        "decode_s": round(s.decode_s, 3), "decode_tokens_per_s": round(s.new_tokens / s.decode_s, 1),
        "ms_per_decode_step": round(1e3 * s.decode_s / args.max_new_tokens, 2),
        "wall_s": round(wall_s, 3), "compile_s": round(compile_s, 1), "init_s": round(init_s, 1),
        "peak_memory_gib": round(mem.get("peak_bytes_in_use", 0) / 2**30, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
