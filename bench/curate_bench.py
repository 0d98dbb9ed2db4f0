"""Curation throughput: MLM-Filter / SigLIP scoring samples/s per device, the other filters per core.

    python bench/curate_bench.py                      # full size: SigLIP-so400m + Qwen2.5-1.5B, GPU
    python bench/curate_bench.py --size tiny --samples 64   # the test-size models, runs on a CPU

Full size is the MLM-Filter model's shapes (144 image tokens, bf16) with random weights: the shapes,
not the weights, set the speed. Each request is the real su prompt: with --tokenizer (a Qwen2.5
tokenizer directory) its true token count, otherwise its length in characters / 4 random ids (stated
in the output). Scoring runs the curator's own device-split generator (2 new tokens, greedy) over
all local devices; the first batch compiles and is not timed. The SigLIP score runs the so400m pair.
The other filters run one Python process (one core): decode + pixel hash of synthetic 512x384 JPEGs
(pass 1 without models), selection over uid lists with dedup (pass 2), and resharding (pass 3).
Numbers print as JSON lines; at --size tiny on a CPU they only show that the bench runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _model_configs(size: str, dtype: str, args_image_tokens: int = 144):
    from oq2vl_jax.models import ModelConfig, TextConfig, VisionConfig
    from oq2vl_jax.models.siglip_text import SiglipPairConfig, SiglipTextConfig

    if size == "full":
        # The authors' training script for this model: last-layer patches average-pooled to 144 tokens.
        vision = VisionConfig(hidden_act="gelu_pytorch_tanh", feature_layer=-1)
        mlm = ModelConfig(vision=vision, text=TextConfig(vocab_size=151936), image_tokens=args_image_tokens,
                          image_token_id=151655,
                          dtype=dtype, vision_dtype=dtype, param_dtype=dtype, remat="none")
        pair = SiglipPairConfig(vision=VisionConfig(hidden_act="gelu_pytorch_tanh", feature_layer=-1,
                                                    feature_post_layernorm=True), text=SiglipTextConfig())
        return mlm, pair
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=70, hidden_act="gelu_pytorch_tanh")
    text = TextConfig(vocab_size=1100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    mlm = ModelConfig(vision=vision, text=text, image_tokens=25, image_token_id=1000, dtype=dtype,
                      vision_dtype=dtype, param_dtype=dtype, remat="none")
    pair = SiglipPairConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=42, hidden_act="gelu_pytorch_tanh", feature_layer=-1,
                            feature_post_layernorm=True),
        text=SiglipTextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=12, projection_size=32))
    return mlm, pair


def _prompt_length(args) -> tuple[int, str]:
    from oq2vl_jax.data import mlm_filter

    caption = "a wooden bench in a park next to a lake with ducks swimming in the evening light"
    if args.tokenizer:
        from transformers import AutoTokenizer

        enc = mlm_filter.PromptEncoder(AutoTokenizer.from_pretrained(args.tokenizer), args.metric, 1, -5)
        return len(enc.ids_before_expansion(caption)) - 1, "tokenized"
    return len(mlm_filter.render_prompt(caption, args.metric)) // 4, "estimated as characters / 4"


def bench_mlm(args, mlm_cfg) -> dict:
    import jax

    from oq2vl_jax.data.mlm_filter import sharded_generator_class
    from oq2vl_jax.generate import Prompt
    from oq2vl_jax.models import build

    text_len, how = _prompt_length(args)
    model = build(mlm_cfg)
    gen = sharded_generator_class()(model, pad_id=0, stop_ids=(), pad_multiple=64)
    n_dev = gen.n_devices
    batch = -(-args.batch // n_dev) * n_dev
    rng = np.random.default_rng(0)
    size, k = mlm_cfg.vision.image_size, mlm_cfg.image_tokens
    vocab = min(mlm_cfg.text.vocab_size, mlm_cfg.image_token_id)

    def prompts(n):
        out = []
        for _ in range(n):
            ids = rng.integers(2, vocab, 20).tolist() + [mlm_cfg.image_token_id] * k + \
                  rng.integers(2, vocab, text_len).tolist()
            out.append(Prompt(ids, rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)))
        return out

    gen(prompts(batch), max_new_tokens=2, batch_size=batch)  # compiles
    todo = prompts(args.samples)
    t0 = time.perf_counter()
    gen(todo, max_new_tokens=2, batch_size=batch)
    dt = time.perf_counter() - t0
    return {"bench": "mlm_filter_score", "size": args.size, "devices": n_dev, "device": str(jax.devices()[0]),
            "batch": batch, "prompt_tokens": len(todo[0].ids), "prompt_text_length": how,
            "samples": args.samples, "seconds": round(dt, 3),
            "samples_per_s_per_device": round(args.samples / dt / n_dev, 4)}


def bench_siglip(args, pair_cfg) -> dict:
    import jax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from oq2vl_jax.models.layers import dtype_of
    from oq2vl_jax.models.siglip_text import SiglipPair

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    model = SiglipPair(pair_cfg, dtype=dtype_of(args.dtype), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    split = NamedSharding(mesh, P("data"))
    cosine = jax.jit(lambda st, x, ids: nnx.merge(graphdef, st).cosine(x, ids))
    batch = -(-args.batch * 4 // len(devices)) * len(devices)
    rng = np.random.default_rng(0)
    s, L = pair_cfg.vision.image_size, pair_cfg.text.max_position_embeddings
    x = jax.device_put(rng.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32), split)
    ids = jax.device_put(rng.integers(0, pair_cfg.text.vocab_size, (batch, L)).astype(np.int32), split)
    jax.block_until_ready(cosine(state, x, ids))
    steps = max(1, args.samples // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = cosine(state, x, ids)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    return {"bench": "siglip_score", "size": args.size, "devices": len(devices), "batch": batch,
            "samples": steps * batch, "seconds": round(dt, 3),
            "samples_per_s_per_device": round(steps * batch / dt / len(devices), 2),
            "note": "device compute only (host-side image resize and tokenization not included)"}


def bench_cpu_filters(args) -> list[dict]:
    from PIL import Image

    from oq2vl_jax.data import curate
    from oq2vl_jax.data.curate_select import Selection, decide

    import pyarrow.parquet  # noqa: F401  (imports kept out of the timings)
    import webdataset  # noqa: F401  (imported by write_shard)

    rng = np.random.default_rng(0)
    n = args.cpu_samples
    base = rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        import tarfile

        shard = os.path.join(tmp, "00000.tar")
        with tarfile.open(shard, "w") as tf:
            for i in range(n):
                img = np.roll(base, i, axis=1)  # photo-sized, distinct pixels
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                uid = f"{rng.integers(0, 1 << 62):032x}"
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"caption {i}".encode()),
                                  ("json", json.dumps({"uid": uid}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        cfg = curate.CurateConfig(out=os.path.join(tmp, "out"), samples_per_shard=1000, dedup=True)
        os.makedirs(os.path.join(cfg.out, "scores"))
        os.makedirs(os.path.join(cfg.out, "shards"))
        unit = curate.make_units([shard], 1)[0]
        t0 = time.perf_counter()
        curate.score_unit(cfg, unit, curate.Scorers(cfg))
        t_read = time.perf_counter() - t0

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(os.path.join(cfg.out, "scores", unit.name + ".parquet"))
        big = pa.concat_tables([table] * max(1, args.select_samples // n))  # a larger table to select on
        t0 = time.perf_counter()
        cols = curate._columns(big, cfg, [])
        codes, _ = decide(cols, Selection(keep_uids=np.unique(cols.uid[::2]), dedup=True))
        t_select = time.perf_counter() - t0
        table = table.to_pydict()
        rows = [(table["shard"][i], table["index"][i], table["key"][i]) for i in range(n)]
        t0 = time.perf_counter()
        curate.write_shard(cfg, 0, rows, {})
        t_write = time.perf_counter() - t0
    return [
        {"bench": "decode_hash_jpeg_512x384", "samples": n, "samples_per_s_per_core": round(n / t_read, 1)},
        {"bench": "select_uids_dedup", "samples": len(codes), "samples_per_s_per_core": round(len(codes) / t_select, 1)},
        {"bench": "reshard_write", "samples": n, "samples_per_s_per_core": round(n / t_write, 1)},
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--metric", default="su")
    p.add_argument("--tokenizer", help="Qwen2.5 tokenizer directory, for the true prompt length")
    p.add_argument("--image-tokens", type=int, default=144,
                   help="full size: 144 (aapool_mlp, the authors' script) or 729 (mlp2x_gelu)")
    p.add_argument("--batch", type=int, default=64, help="MLM-Filter rows per step (SigLIP: 4x)")
    p.add_argument("--samples", type=int, default=512, help="scored samples timed")
    p.add_argument("--cpu-samples", type=int, default=200, help="JPEG samples for the per-core filters")
    p.add_argument("--select-samples", type=int, default=200000, help="table rows for the selection bench")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 at full size, float32 tiny")
    p.add_argument("--skip", nargs="*", default=[], choices=("mlm", "siglip", "cpu"))
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.size == "full" else "float32")
    mlm_cfg, pair_cfg = _model_configs(args.size, args.dtype, args.image_tokens)
    results = []
    if "cpu" not in args.skip:
        results += bench_cpu_filters(args)
    if "mlm" not in args.skip:
        results.append(bench_mlm(args, mlm_cfg))
    if "siglip" not in args.skip:
        results.append(bench_siglip(args, pair_cfg))
    for r in results:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
