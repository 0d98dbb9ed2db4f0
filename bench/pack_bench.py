"""Packing throughput: samples/s (total and per worker core) and FFD speed/fill vs the original loop.

    python bench/pack_bench.py [--samples 2000] [--shards 4] [--workers 1 2] [--image-px 512]

Synthetic WebDataset shards stand in for real data: JPEG images of smooth random texture at
image-px × 3/4·image-px (img2dataset's 512 keep-ratio output is similar), captions of lognormal length.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from oq2vl_jax.data import pack  # noqa: E402
from oq2vl_jax.data.demo import write_demo  # noqa: E402
from oq2vl_jax.data.ffd import fill_rate, first_fit_decreasing, first_fit_decreasing_reference  # noqa: E402

WORDS = ("a red blue green small large photo of the cat dog tree house car street man woman sky water "
         "on in with near under over bright dark old new").split()


def make_shards(root, n, shards, px, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    per = -(-n // shards)
    for s in range(shards):
        p = os.path.join(root, f"{s:05d}.tar")
        with tarfile.open(p, "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
                im = Image.fromarray(small).resize((px, px * 3 // 4), Image.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                cap = " ".join(rng.choice(WORDS, size=int(np.clip(rng.lognormal(2.7, 0.5), 3, 120))))
                for name, data in ((f"{i:08d}.jpg", buf.getvalue()), (f"{i:08d}.txt", cap.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(p)
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--image-px", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--image-tokens", type=int, default=144)
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores")

    # FFD alone on a 10k-sample shard of caption lengths.
    rng = np.random.default_rng(0)
    lengths = [int(t) + a.image_tokens + 3 for t in np.clip(rng.lognormal(3.2, 0.5, 10_000), 1, 400)]
    t = time.perf_counter()
    bins = first_fit_decreasing(lengths, a.seq_len, [1] * len(lengths), a.seq_len // (a.image_tokens + 3))
    t_ffd = time.perf_counter() - t
    t = time.perf_counter()
    ref = first_fit_decreasing_reference(lengths, a.seq_len)
    t_ref = time.perf_counter() - t
    print(f"FFD 10k items: tree {t_ffd * 1e3:.0f} ms, original loop {t_ref * 1e3:.0f} ms; fill "
          f"{fill_rate(lengths, bins, a.seq_len):.4f} vs original {fill_rate(lengths, ref, a.seq_len):.4f}")

    with tempfile.TemporaryDirectory() as root:
        write_demo(os.path.join(root, "demo"), num_samples=64, shard_size=64)  # just for its tokenizer
        t = time.perf_counter()
        shards = make_shards(root, a.samples, a.shards, a.image_px)
        print(f"made {a.samples} samples in {a.shards} shards ({a.image_px}px JPEG) in {time.perf_counter() - t:.1f}s")
        for w in a.workers:
            cfg = pack.PackConfig(tokenizer=os.path.join(root, "demo", "tokenizer"), out=os.path.join(root, f"out{w}"),
                                  seq_len=a.seq_len, image_tokens=a.image_tokens, image_size=a.image_size)
            t = time.perf_counter()
            stats = pack.run(cfg, shards, workers=w, log=lambda m: None)
            dt = time.perf_counter() - t
            print(f"pack workers={w}: {stats['samples_in'] / dt:.0f} samples/s, "
                  f"{stats['samples_in'] / dt / w:.0f} samples/s/core (incl. tokenizer load + process start), "
                  f"{stats['rows']} rows, fill {stats['fill_rate']:.4f}")


if __name__ == "__main__":
    main()
