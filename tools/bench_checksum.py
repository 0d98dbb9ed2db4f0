"""Cost of checkpoint checksums (oq2vl_jax.integrity) at full size, measured on this machine.

    python tools/bench_checksum.py --gib 2 --params 1.5e9

Writes a GIB-sized file of random float32 (a stand-in for Orbax's array files), then times
integrity.compute over it (read back from the page cache + xxh3_64, parallel over files) and the
raw hashing throughput of xxh3_64, CRC-32, Adler-32 and BLAKE2b on an in-memory buffer.
BENCH_DIR picks the file system the files go to (default: the system temp folder). Prints the seconds
a save of PARAMS float32 parameters plus AdamW state (mu, nu: 3x the bytes) would take at that rate.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oq2vl_jax import integrity  # noqa: E402


def rate(fn, buf, repeat=3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(buf)
        best = min(best, time.perf_counter() - t0)
    return len(buf) / best / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="bytes measured (GiB)")
    p.add_argument("--files", type=int, default=8, help="files the bytes are split into (Orbax writes many)")
    p.add_argument("--params", type=float, default=1.5e9)
    a = p.parse_args()
    full = 3 * a.params * 4 / 2**30  # params + AdamW mu + nu, float32
    n = int(a.gib * 2**30) // 4
    data = np.random.default_rng(0).standard_normal(n, dtype=np.float32).view(np.uint8)
    mem = memoryview(data)[: 1 << 30]
    print(f"cpu: {os.cpu_count()} cores; full save = 3 x {a.params:.3g} x 4 B = {full:.1f} GiB")
    import xxhash

    for name, fn in (("xxh3_64", lambda b: xxhash.xxh3_64(b).digest()), ("crc32", zlib.crc32),
                     ("adler32", zlib.adler32), ("blake2b", lambda b: hashlib.blake2b(b).digest())):
        r = rate(fn, mem)
        print(f"{name:8s} in memory, 1 thread: {r:5.2f} GiB/s -> {full / r:6.1f} s per full save")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        for i, part in enumerate(np.array_split(data, a.files)):
            part.tofile(os.path.join(d, f"f{i}"))
        del data, mem
        for threads in (1, os.cpu_count() or 1):
            t0 = time.perf_counter()
            integrity.compute(d, threads=threads)
            dt = time.perf_counter() - t0
            r = a.gib / dt
            print(f"integrity.compute, {threads:2d} threads (page cache): {r:5.2f} GiB/s -> "
                  f"{full / r:6.1f} s per full save")


if __name__ == "__main__":
    main()
