"""Benchmark-evaluation throughput in questions/s at a config's full size (prefill-dominated).

    python bench/eval_bench.py --config configs/sft.yaml --batch 32          # on a GPU
    python bench/eval_bench.py --tiny                                        # CPU smoke run, tiny model

Each question is an MMBench-style prompt: <s>, one image's slots, then `--prompt-tokens` random text
tokens (the rendered question, options and trigger). Two protocols are timed, both through the eval's
own DataParallelGenerator over all local devices with a randomly initialised model (shapes, not
weights, set the speed): `generate` (greedy, 16 new tokens as the original; no stop token fires with
random weights and no stop ids, so every question costs the full 16 steps, an upper bound) and
`likelihood` (AI2D: one forward pass per question). The first pass compiles; the figures come from a
second, timed pass over `--questions` questions (compile time is reported apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import synthetic_prompts  # noqa: E402

from oq2vl_jax.config import load_config  # noqa: E402
from oq2vl_jax.eval.parallel import DataParallelGenerator, local_mesh  # noqa: E402
from oq2vl_jax.models import build, count_params  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/sft.yaml")
    p.add_argument("--tiny", action="store_true", help="configs/tiny.yaml at its small size (runs on a CPU)")
    p.add_argument("--batch", type=int, default=32, help="questions per batch (over all local devices)")
    p.add_argument("--questions", type=int, default=128, help="questions in the timed pass")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per question after the image")
    p.add_argument("--max-new-tokens", type=int, default=16, help="the original's 16")
    p.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    args = p.parse_args(argv)

    config = "configs/tiny.yaml" if args.tiny else args.config
    # Random weights need no tokenizer; the tiny config derives these two from one, so they are set here.
    tiny = ["model.text.vocab_size=512", "model.image_token_id=386"] if args.tiny else []
    cfg = load_config(config, ["train.init_from=null", "tokenizer=null"] + tiny + args.set)
    model_cfg = dataclasses.replace(cfg.model, remat="none")
    t0 = time.perf_counter()
    model = build(model_cfg, seed=0)
    init_s = time.perf_counter() - t0
    gen = DataParallelGenerator(model, mesh=local_mesh(), pad_id=0, stop_ids=(), pad_multiple=32)
    batch = -(-args.batch // gen.n_devices) * gen.n_devices
    prompts = synthetic_prompts(model_cfg, args.questions, 1, args.prompt_tokens)
    options = list(range(2, 6))  # four "letters"

    results = {}
    for name, fn in {
        "generate": lambda ps: gen(ps, max_new_tokens=args.max_new_tokens, batch_size=batch),
        "likelihood": lambda ps: gen.option_probs(ps, options, batch),
    }.items():
        fn(prompts[:batch])  # compile
        compile_s = gen.stats.compile_s
        gen.stats = type(gen.stats)()
        t0 = time.perf_counter()
        fn(prompts)
        wall = time.perf_counter() - t0
        assert gen.stats.compile_s == 0, "the timed pass recompiled"
        results[name] = {"questions_per_s": round(len(prompts) / wall, 2), "wall_s": round(wall, 3),
                         "compile_s": round(compile_s, 1)}
        if name == "generate":
            s = gen.stats
            results[name].update(prefill_s=round(s.prefill_s, 3), decode_s=round(s.decode_s, 3),
                                  new_tokens=s.new_tokens)

    print(json.dumps({
        "device": jax.devices()[0].device_kind, "devices": gen.n_devices, "config": config,
        "params": count_params(model), "dtype": model_cfg.dtype, "batch": batch, "questions": len(prompts),
        "prompt_tokens_per_question": len(prompts[0].ids), "max_new_tokens": args.max_new_tokens,
        "init_s": round(init_s, 1), **results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
