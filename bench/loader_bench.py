"""Loader throughput: images/s and rows/s (total and per core) of the Grain training iterator.

    python bench/loader_bench.py [--samples 600] [--image-size 384] [--workers 0 1 2] [--batches 20]

Packs synthetic caption shards (see pack_bench.py) at the real geometry (seq 4096, 144 image tokens,
384px JPEG q95 unless overridden), then times decode + normalise + batch. num_workers=0 decodes in
read threads of the main process; N>0 uses N worker processes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from pack_bench import make_shards  # noqa: E402

from oq2vl_jax.data import pack  # noqa: E402
from oq2vl_jax.data.demo import write_demo  # noqa: E402
from oq2vl_jax.data.loader import LoaderConfig, make_train_iterator  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--image-tokens", type=int, default=144)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--image-dtype", nargs="+", default=["float32", "uint8"], choices=["float32", "uint8"])
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as root:
        write_demo(os.path.join(root, "demo"), num_samples=64, shard_size=64)
        shards = make_shards(root, a.samples, 2, 512)
        cfg = pack.PackConfig(tokenizer=os.path.join(root, "demo", "tokenizer"), out=os.path.join(root, "out"),
                              seq_len=a.seq_len, image_tokens=a.image_tokens, image_size=a.image_size)
        st = pack.run(cfg, shards, workers=2, log=lambda m: None)
        max_images = st["max_images"]
        print(f"{st['rows']} rows, {st['images']} images ({st['images'] / st['rows']:.1f}/row), "
              f"max_images slots {max_images}")
        for w, dtype in [(w, d) for d in a.image_dtype for w in a.workers]:
            lc = LoaderConfig(sources=((cfg.out, 1.0),), batch_size=a.batch_size, seq_len=a.seq_len,
                              max_images=max_images, image_size=a.image_size, num_workers=w, image_dtype=dtype)
            it = make_train_iterator(lc, process_index=0, process_count=1)
            next(it)  # warm-up: worker start, first decode
            t = time.perf_counter()
            n_img = n_rows = 0
            for _ in range(a.batches):
                b = next(it)
                n_img += int(b["image_mask"].sum())
                n_rows += b["input_ids"].shape[0]
            dt = time.perf_counter() - t
            cores = max(w, 1)
            print(f"loader num_workers={w} images={dtype}: {n_img / dt:.0f} images/s ({n_img / dt / cores:.0f} per core), "
                  f"{n_rows / dt:.1f} rows/s = {n_rows * a.seq_len / dt / 1e3:.0f}k tokens/s")
            getattr(it, "close", lambda: None)()


if __name__ == "__main__":
    main()
