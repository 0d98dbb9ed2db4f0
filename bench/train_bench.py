"""Throughput of our pre-training step on synthetic packed rows: tokens/s per device, MFU, peak memory.

    python bench/train_bench.py --config configs/pretrain.yaml --rows-per-device 2 --images-per-row 22

Rows are packed like the real data: `images-per-row` samples of [<s>, 144 image tokens, caption],
caption lengths filling the row to ~99%, segment ids and per-sample positions, random pixels in the
first `images-per-row` of the config's `data.max_images` slots (the rest empty, as in real rows). The
step is the real `train_step` (frozen tower forward, projector + LLM forward/backward, AdamW), jitted
with the configured mesh and donated state. MFU uses oq2vl_jax/flops.py (the formula is documented
there: 6N per LLM token, causal attention over the whole row once, the frozen tower's forward).
Run it beside the PyTorch baseline (a script kept outside this repository) on the same GPU.

model.arch qwen2_vl configs (e.g. configs/qwen2vl_sft.yaml) get rows of `images-per-row` samples of
[vision start, image tokens, vision end, caption], each image a `--image-grid H W` patch grid (default
32 32: a 448x448 image, 256 tokens), the row's patches packed into its patch row of data.max_patches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import jax
import numpy as np

from oq2vl_jax.config import load_config
from oq2vl_jax.flops import peak_flops_per_device, train_step_flops
from oq2vl_jax.train import Trainer, to_global
from oq2vl_jax.train_step import MODEL_KEYS, batch_shardings


def synthetic_rows(cfg, rows: int, images_per_row: int, seed: int = 0) -> dict:
    """Packed rows of `images_per_row` caption samples each, as oq2vl_jax.data.pack writes them."""
    rng = np.random.default_rng(seed)
    m, t = cfg.model, cfg.data.seq_len
    k = m.image_tokens
    budget = int(t * 0.99) - images_per_row * (k + 1)
    if budget < images_per_row * 3:
        raise SystemExit(f"{images_per_row} images of {k} tokens do not fit a {t}-token row")
    out = {n: np.zeros((rows, t), np.int32) for n in ("input_ids", "segment_ids", "positions", "loss_mask")}
    for r in range(rows):
        caps = rng.multinomial(budget - images_per_row * 2, [1 / images_per_row] * images_per_row) + 2
        start = 0
        for s, cap in enumerate(caps):
            n = 1 + k + cap
            ids = np.concatenate([[1], np.full(k, m.image_token_id), rng.integers(2, min(1000, m.text.vocab_size), cap)])
            sl = slice(start, start + n)
            out["input_ids"][r, sl] = ids
            out["segment_ids"][r, sl] = s + 1
            out["positions"][r, sl] = np.arange(n)
            out["loss_mask"][r, sl] = ids != m.image_token_id
            start += n
    size = m.vision.image_size
    out["images"] = rng.uniform(-1, 1, (rows, cfg.data.max_images, size, size, 3)).astype(np.float32)
    out["image_mask"] = np.arange(cfg.data.max_images)[None].repeat(rows, 0) < images_per_row
    return out


def synthetic_rows_qwen2_vl(cfg, rows: int, images_per_row: int, grid: tuple[int, int], seed: int = 0) -> dict:
    """Packed Qwen2-VL rows as the qwen2vl_caption packer and Qwen2VLRowDecoder make them."""
    from oq2vl_jax.data.qwen2_vl_images import pack_patch_row
    from oq2vl_jax.models.mrope import rope_index

    rng = np.random.default_rng(seed)
    m, t, v = cfg.model, cfg.data.seq_len, cfg.model.qwen2_vl_vision
    merge = v.spatial_merge_size
    k = grid[0] * grid[1] // merge**2
    p_row = cfg.data.max_patches or 4 * t
    budget = int(t * 0.99) - images_per_row * (k + 2)
    if budget < images_per_row * 3 or images_per_row * k * merge**2 > p_row:
        raise SystemExit(f"{images_per_row} images of {k} tokens do not fit a {t}-token row / {p_row} patches")
    out = {n: np.zeros((rows, t), np.int32) for n in ("input_ids", "segment_ids", "loss_mask")}
    out["positions"] = np.zeros((rows, 3, t), np.int32)
    patches = []
    for r in range(rows):
        caps = rng.multinomial(budget - images_per_row * 2, [1 / images_per_row] * images_per_row) + 2
        start = 0
        for s, cap in enumerate(caps):
            ids = np.concatenate([[m.vision_start_token_id], np.full(k, m.image_token_id), [m.vision_end_token_id],
                                  rng.integers(2, min(1000, m.text.vocab_size), cap)])
            sl = slice(start, start + len(ids))
            out["input_ids"][r, sl], out["segment_ids"][r, sl] = ids, s + 1
            out["positions"][r, :, sl] = rope_index(ids, [grid], m.image_token_id, merge)[0]
            out["loss_mask"][r, sl] = np.arange(len(ids)) >= k + 2
            start += len(ids)
        imgs = [(rng.normal(size=(grid[0] * grid[1], v.patch_dim)).astype(np.float32), grid)] * images_per_row
        patches.append(pack_patch_row(imgs, p_row, merge))
    out["patches"], out["patch_segment_ids"], out["patch_positions"] = (np.stack(x) for x in zip(*patches))
    out["image_mask"] = np.arange(cfg.data.max_images)[None].repeat(rows, 0) < images_per_row
    return out


def compile_only(trainer, cfg, example) -> int:
    """Lowers and compiles the step for abstract inputs (nothing allocated) and prints XLA's
    per-device memory analysis: on a GPU, whether a config fits before allocating it. The CPU
    compiler's schedule does not reflect activation checkpointing (a plain jax.checkpoint stack
    shows the same temp size with and without it there), so CPU figures are far too high."""
    shardings = batch_shardings(trainer.mesh, example, True)
    batch = {k: jax.ShapeDtypeStruct(example[k].shape, example[k].dtype, sharding=shardings[k])
             for k in MODEL_KEYS if k in example}
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    mem = compiled.memory_analysis()
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "rows_per_micro_batch": example["input_ids"].shape[1], "micro_batches": cfg.train.micro_batches,
        "vision_chunk_size": cfg.model.vision_chunk_size, "compile_s": round(time.perf_counter() - t0, 1),
        "argument_gib": gib(mem.argument_size_in_bytes), "output_gib": gib(mem.output_size_in_bytes),
        "alias_gib": gib(mem.alias_size_in_bytes), "temp_gib": gib(mem.temp_size_in_bytes),
    }))
    trainer.mngr.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/pretrain.yaml")
    p.add_argument("--rows-per-device", type=int, default=2, help="rows per device per micro-batch")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--images-per-row", type=int, default=22)
    p.add_argument("--image-grid", type=int, nargs=2, default=(32, 32), metavar=("H", "W"),
                   help="qwen2_vl: each image's patch grid (default 32 32 = 448x448 pixels)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE")
    p.add_argument("--compile-only", action="store_true",
                   help="compile for abstract inputs and print the per-device memory analysis")
    args = p.parse_args(argv)

    n_dev = jax.device_count()
    rows = args.rows_per_device * n_dev * args.micro_batches
    overrides = [f"data.global_batch_size={rows}", f"train.micro_batches={args.micro_batches}",
                 "train.init_from=null", "tokenizer=null"] + args.set
    cfg = load_config(args.config, overrides)
    if cfg.data.max_images < args.images_per_row:  # the config's slots, the rest left empty as in real data
        cfg = load_config(args.config, overrides + [f"data.max_images={args.images_per_row}"])
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="train_bench_"))
    qwen2_vl = cfg.model.arch == "qwen2_vl"
    if qwen2_vl:
        local = synthetic_rows_qwen2_vl(cfg, rows, args.images_per_row, tuple(args.image_grid))
    else:
        local = synthetic_rows(cfg, rows, args.images_per_row)
    example = {k: v.reshape((args.micro_batches, -1) + v.shape[1:]) for k, v in local.items()}
    if args.compile_only:
        return compile_only(trainer, cfg, example)
    state, _ = trainer.initial_state(data_iter=None)
    batch = to_global(local, batch_shardings(trainer.mesh, example, True), args.micro_batches)

    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / args.steps

    tokens = rows * cfg.data.seq_len
    # qwen2_vl counts the tower's work in patches (flops.py).
    units = int(np.count_nonzero(local["patch_segment_ids"])) if qwen2_vl else rows * args.images_per_row
    flops = train_step_flops(cfg.model, rows, cfg.data.seq_len, units, vision_trained=trainer.vision_trained,
                             patch_row=cfg.data.max_patches or 4 * cfg.data.seq_len)
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    result = {
        "device": jax.devices()[0].device_kind, "devices": n_dev, "seq_len": cfg.data.seq_len,
        "rows_per_device": args.rows_per_device, "micro_batches": args.micro_batches,
        "images_per_row": args.images_per_row, "image_slots": cfg.data.max_images,
        "vision_chunk_size": cfg.model.vision_chunk_size, "image_tokens": cfg.model.image_tokens,
        "attention": cfg.model.attention, "remat": cfg.model.remat, "dtype": cfg.model.dtype,
        "step_s": round(step_s, 4), "first_step_s": round(compile_s, 1),
        "tokens_per_s_per_device": round(tokens / step_s / n_dev, 1),
        "tflops_per_device": round(flops / step_s / n_dev / 1e12, 2),
        "mfu": round(flops / step_s / n_dev / peak, 4) if peak else None,
        "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        "loss": float(metrics["loss"]),
    }
    print(json.dumps(result))
    trainer.mngr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
