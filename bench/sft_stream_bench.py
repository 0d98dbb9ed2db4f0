"""Peak memory of reading (and packing) a large SFT json list: streamed vs read whole.

    python bench/sft_stream_bench.py --mb 1024 [--pack] [--keep FILE]

Writes a LLaVA-style .json list of about --mb MB of text conversations (varied lengths), then, each in
a fresh process, reports peak RSS for: "whole" (the earlier reader: f.read() then json.loads, as the
original's json.load), "stream" (readers.iter_json_records: ijson, one sample at a time) and, with
--pack, the whole `pack --mode sft` run on the file (tiny demo tokenizer, FFD rows of 4096).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)

WORDS = ("a red blue green small large photo of the cat dog tree house car street man woman sky water "
         "on in with near under over bright dark old new what is shown describe the picture").split()


def write_json(path: str, mb: int, seed: int = 0) -> int:
    """Streams about `mb` MB of conversations into a .json list; returns the sample count."""
    rng = np.random.default_rng(seed)
    target, n, size = mb * 1_000_000, 0, 0
    with open(path, "w") as f:
        f.write("[")
        while size < target:
            q = " ".join(rng.choice(WORDS, int(rng.integers(5, 40))))
            a = " ".join(rng.choice(WORDS, int(rng.integers(10, 120))))
            rec = json.dumps({"id": f"s{n}", "conversations": [{"from": "human", "value": q + "?"},
                                                                {"from": "gpt", "value": a + "."}]})
            f.write(("," if n else "") + rec)
            size += len(rec) + 1
            n += 1
        f.write("]")
    return n


def _child(kind: str, path: str, tok: str | None) -> None:
    t0 = time.perf_counter()
    if kind == "whole":
        with open(path, "rb") as f:
            n = len(json.loads(f.read()))
    elif kind == "stream":
        from oq2vl_jax.data import readers

        errors: list = []
        n = sum(1 for _ in readers.iter_json_records(path, errors))
        assert not errors, errors
    else:
        from oq2vl_jax.data import pack

        out = tempfile.mkdtemp()
        try:
            st = pack.run(pack.PackConfig(tokenizer=tok, out=out, mode="sft", seq_len=4096), [path],
                          log=lambda m: None)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        n = st["samples_packed"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"kind": kind, "samples": n, "peak_rss_mib": round(rss), "seconds": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--pack", action="store_true", help="also measure the full pack run")
    p.add_argument("--keep", help="write/reuse the json here instead of a temporary file")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child[0], a.child[1], a.child[2] if a.child[2] != "-" else None)
        return
    path = a.keep or os.path.join(tempfile.mkdtemp(), "sft.json")
    if not os.path.exists(path):
        n = write_json(path, a.mb)
        print(f"wrote {path}: {os.path.getsize(path) / 1e6:.0f} MB, {n} conversations", flush=True)
    tok = "-"
    if a.pack:
        from oq2vl_jax.data.demo import write_demo

        demo = tempfile.mkdtemp()
        write_demo(demo, num_samples=64, image_size=16, shard_size=64)
        tok = os.path.join(demo, "tokenizer")
    for kind in ("stream", "whole") + (("pack",) if a.pack else ()):
        r = subprocess.run([sys.executable, __file__, "--child", kind, path, tok], capture_output=True, text=True,
                           cwd=ROOT)
        print(r.stdout.strip() or r.stderr.strip()[-2000:], flush=True)


if __name__ == "__main__":
    main()
