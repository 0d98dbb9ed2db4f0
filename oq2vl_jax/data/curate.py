"""Curates image-text WebDataset shards before packing: MLM-Filter / SigLIP scores, uid lists, dedup.

    python -m oq2vl_jax.data.curate --input 'shards/{00000..00099}.tar' --out DIR \\
        --mlm-filter checkpoints/mlm-filter --metric su --min 85 --keep-uids dfn_top20m.npy --dedup

Open-Qwen2VL's DataComp filter is the command above: MLM-Filter semantic-understanding score >= 85,
united with the DFN top-20M uid list. Which samples are kept, and the drop reasons, are documented in
oq2vl_jax/data/curate_select.py; in short: readable, not in any --drop-uids list, accepted by at least
one selector (--keep-uids, --min, --siglip-min; none given = all), and with --dedup not an exact
repeat (decoded pixels, then uid) of an earlier kept sample.

Three passes:
  1. score: each input shard is streamed (data/readers.iter_tar), every sample's uid, caption and decoded
     image checked, its pixel hash and the requested scores computed, and one table written to
     DIR/scores/<shard>.parquet with its marker DIR/scores/<shard>.json (written last). A re-run
     reuses every shard whose marker matches the scorers and the input file; thresholds, uid lists
     and --dedup are not part of it, so changing them only redoes passes 2 and 3. Shards are split
     across processes (multi-host); the MLM-Filter / SigLIP batches are split over the local devices;
     images are decoded, hashed and resized by --workers threads, --chunk samples at a time.
  2. select: all tables, in input order, are decided on (deterministic), and DIR/scores.parquet is
     written: shard, index, key, uid, status, pixel_hash, the score columns and the decision.
     ``--scores DIR/scores.parquet`` reuses its score columns in a later run instead of the models.
  3. write: the kept samples, in input order and with their original files and keys, are resharded
     into DIR/shards/000000.tar, ... of --samples-per-shard samples each (webdataset TarWriter, fixed
     mtime: identical inputs give identical bytes), each with a marker DIR/shards/NNNNNN.json naming
     its samples; a re-run rewrites only shards whose marker differs.
Then DIR/stats.json accounts for every sample read: kept + dropped (by reason) + unreadable (by
reason) = samples_in; shards that could not be read to the end are listed in bad_shards (their
readable part is curated; a re-run retries them). Pack the result with
``python -m oq2vl_jax.data.pack --input 'DIR/shards/*.tar' ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np

from oq2vl_jax import cli, failures, locks
from oq2vl_jax.data import readers
from oq2vl_jax.data.curate_score import (SCORES_VERSION, TABLE_COLUMNS, Scorers, TarSamples, _arrow_type,
                                         _marker_ok, _write_json, score_unit)
from oq2vl_jax.data.curate_select import REASONS, U128, Columns, Selection, decide, load_uid_list
from oq2vl_jax.data.pack import _input_signature, make_units

log = logging.getLogger("oq2vl_jax.curate")
TAR_MTIME = 0.0


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    out: str
    samples_per_shard: int = 10000
    mlm_filter: str | None = None  # converted MLM-Filter checkpoint directory
    metric: str = "su"
    mlm_min: float | None = None  # selector on, when given
    max_new_tokens: int = 2
    siglip: str | None = None  # converted SigLIP (image + text towers) directory
    siglip_min: float | None = None
    scores: str | None = None  # an earlier DIR/scores.parquet to take scores from
    keep_uids: tuple[str, ...] = ()
    drop_uids: tuple[str, ...] = ()
    dedup: bool = False
    batch_size: int = 64
    dtype: str | None = None
    chunk: int = 512  # samples decoded and scored together (bounds decoded images held in memory)
    workers: int = 1  # threads decoding, hashing and resizing images

    def __post_init__(self):
        from oq2vl_jax.data.mlm_filter import check_metric

        try:
            check_metric(self.metric)
        except ValueError as e:
            raise cli.UserError(str(e)) from None
        for name in ("samples_per_shard", "batch_size", "chunk", "max_new_tokens", "workers"):
            if getattr(self, name) < 1:
                raise cli.UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def mlm_column(self) -> str:
        return f"mlm_{self.metric}"

    def score_fingerprint(self) -> dict:
        """What the per-shard tables depend on (not thresholds, lists or dedup)."""
        def sig(path):
            return None if path is None else _input_signature([path])[0]
        return {"version": SCORES_VERSION, "mlm_filter": sig(self.mlm_filter),
                "metric": self.metric if (self.mlm_filter or self.scores) else None,
                "max_new_tokens": self.max_new_tokens if self.mlm_filter else None,
                "siglip": sig(self.siglip), "scores": sig(self.scores),
                "dtype": self.dtype if (self.mlm_filter or self.siglip) else None}


# --------------------------------------------------------------------------------------------------
# Pass 3: resharded output
# --------------------------------------------------------------------------------------------------

def write_shard(cfg: CurateConfig, j: int, rows: list[tuple[str, int, str]], cache: dict) -> bool:
    """Writes DIR/shards/{j:06d}.tar holding the (shard, index, key) samples in order; False if reused."""
    tar_path = os.path.join(cfg.out, "shards", f"{j:06d}.tar")
    marker = os.path.join(cfg.out, "shards", f"{j:06d}.json")
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    if _marker_ok(marker, {"samples_sha256": digest, "count": len(rows)}, tar_path):
        return False
    for stale in (marker, os.path.join(cfg.out, "stats.json")):  # DIR changes: its summary goes until rewritten
        if os.path.exists(stale):
            os.remove(stale)
    import webdataset as wds

    tmp = f"{tar_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME)
        for shard, index, key in rows:
            got_key, files = _sample_at(cache, shard, index)
            if got_key != key:
                raise RuntimeError(f"{shard} changed since it was scored: sample {index} is {got_key!r}, not {key!r}")
            writer.write({"__key__": key, **files})
        writer.close()
    os.replace(tmp, tar_path)
    _write_json(marker, {"samples_sha256": digest, "count": len(rows), "bytes": os.path.getsize(tar_path)})
    return True


def _sample_at(cache: dict, shard: str, index: int):
    """Sample `index` of `shard`, read forward from where the last call stopped: the rows of a
    process's output shards come in input order, so each input shard is mostly streamed once."""
    if cache.get("path") != shard or cache["next"] > index:
        cache.update(path=shard, samples=iter(TarSamples(shard)), next=0)
    for sample in cache["samples"]:
        cache["next"] += 1
        if cache["next"] - 1 == index:
            return sample
    raise RuntimeError(f"{shard} changed since it was scored: it has no sample {index}")


# --------------------------------------------------------------------------------------------------
# Whole run
# --------------------------------------------------------------------------------------------------

def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _selection(cfg: CurateConfig) -> Selection:
    def union(paths):
        if not paths:
            return None
        return np.unique(np.concatenate([load_uid_list(p) for p in paths]))
    if cfg.mlm_min is not None and not (cfg.mlm_filter or cfg.scores):
        raise cli.UserError("--min thresholds MLM-Filter scores: pass --mlm-filter CHECKPOINT or --scores FILE")
    if cfg.siglip_min is not None and not (cfg.siglip or cfg.scores):
        raise cli.UserError("--siglip-min thresholds SigLIP scores: pass --siglip-score DIR or --scores FILE")
    return Selection(keep_uids=union(cfg.keep_uids), drop_uids=union(cfg.drop_uids), mlm_min=cfg.mlm_min,
                     siglip_min=cfg.siglip_min, dedup=cfg.dedup)


def _u128(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = np.empty(len(hi), U128)
    out["f0"], out["f1"] = hi, lo
    return out


def _numpy(column, fill, dtype) -> np.ndarray:
    import pyarrow as pa

    return column.cast(dtype).fill_null(pa.scalar(fill, dtype)).to_numpy()


def _columns(table, cfg: CurateConfig, columns: list[str]) -> Columns:
    """The decision's inputs from the concatenated per-shard tables, without Python objects per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    pixels = table["pixel_hash"].fill_null(pa.scalar(b"\0" * 16, pa.binary(16))).combine_chunks()
    raw = np.frombuffer(pixels.buffers()[1], np.uint8)[pixels.offset * 16:(pixels.offset + n) * 16] if n else \
        np.zeros(0, np.uint8)
    halves = raw.view(">u8").reshape(n, 2).astype(np.uint64)
    cols = Columns(readable=pc.equal(table["status"], "ok").to_numpy(zero_copy_only=False),
                   uid=_u128(_numpy(table["uid_hi"], 0, pa.uint64()), _numpy(table["uid_lo"], 0, pa.uint64())),
                   has_uid=pc.is_valid(table["uid_hi"]).to_numpy(zero_copy_only=False),
                   pixels=_u128(halves[:, 0], halves[:, 1]))
    if cfg.mlm_column in columns:
        cols.mlm = _numpy(table[cfg.mlm_column], np.nan, pa.float64())
        text = cfg.mlm_column + "_text"
        cols.mlm_generated = (pc.is_valid(table[text]).to_numpy(zero_copy_only=False) if text in columns
                              else np.isfinite(cols.mlm))
    if "siglip" in columns:
        cols.siglip = _numpy(table["siglip"], np.nan, pa.float64())
    return cols


def _score_summary(cols: Columns, mlm_column: str) -> dict:
    out = {}
    for name, values in ((mlm_column, cols.mlm), ("siglip", cols.siglip)):
        if values is None:
            continue
        v = values[cols.readable]
        scored = v[~np.isnan(v)]
        out[name] = {"scored": int(len(scored)), "missing": int(len(v) - len(scored)),
                     "mean": float(scored.mean()) if len(scored) else None}
        if name == mlm_column:
            out[name]["unparseable"] = int(np.sum(cols.mlm_generated[cols.readable] & np.isnan(v)))
    return out


def run(cfg: CurateConfig, inputs: list[str]) -> dict:
    """Curates `inputs` (resolved shard paths) into cfg.out; returns (and writes) DIR/stats.json.
    OUT is locked by process 0 meanwhile: a second curate run into it is refused, naming this one."""
    with failures.writing(cfg.out):
        os.makedirs(cfg.out, exist_ok=True)
        with locks.hold(cfg.out, "a curate run") if _process()[0] == 0 else contextlib.nullcontext():
            return _run(cfg, inputs)


def _run(cfg: CurateConfig, inputs: list[str]) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from tqdm import tqdm

    selection = _selection(cfg)  # uid lists are read (and checked) before any scoring
    for sub in ("scores", "shards"):
        os.makedirs(os.path.join(cfg.out, sub), exist_ok=True)
    units = make_units(inputs, 1)
    pid, count = _process()
    scorers = Scorers(cfg)

    t0 = time.perf_counter()
    scored = reused = 0
    with tqdm(units[pid::count], desc="score", unit="shard", disable=None) as bar:
        for unit in bar:
            done = score_unit(cfg, unit, scorers)
            reused += done["reused"]
            scored += done["samples"]
            bar.set_postfix(samples=scored, reused=reused)
    _barrier("oq2vl-curate-scored")

    # Pass 2: every process decides on all tables (cheap next to scoring) and gets the same answer.
    parts, bad_shards = [], {}
    for unit in units:
        try:
            with open(os.path.join(cfg.out, "scores", unit.name + ".json")) as f:
                marker = json.load(f)
        except (OSError, ValueError):
            marker = {}
        if marker.get("scorers") != cfg.score_fingerprint() or marker.get("input") != _input_signature(unit.inputs):
            raise cli.UserError(f"{unit.inputs[0]} has not been scored into {cfg.out}/scores with these scorers "
                                "(with several processes, did one of them fail?)")
        if marker.get("shard_error"):
            bad_shards[unit.inputs[0]] = marker["shard_error"]
        parts.append(pq.read_table(os.path.join(cfg.out, "scores", unit.name + ".parquet")))
    columns = scorers.columns()
    table = pa.concat_tables(parts) if parts else _empty_table(columns)
    cols = _columns(table, cfg, columns)
    codes, tallies = decide(cols, selection)
    if pid == 0:
        names = pa.array(list(REASONS) + ["unreadable"])
        decision = pa.DictionaryArray.from_arrays(pa.array(np.where(codes < 0, len(REASONS), codes).astype(np.int8)),
                                                  names)
        tmp = os.path.join(cfg.out, f"scores.parquet.tmp-{os.getpid()}")
        pq.write_table(table.append_column("decision", decision), tmp)
        os.replace(tmp, os.path.join(cfg.out, "scores.parquet"))

    # Pass 3: output shard j holds kept samples j*S .. (j+1)*S-1 in input order.
    kept = np.flatnonzero(codes == REASONS.index("kept"))
    n_out = -(-len(kept) // cfg.samples_per_shard)
    cache: dict = {}
    written = 0
    with tqdm(range(pid, n_out, count), desc="write", unit="shard", disable=None) as bar:
        for j in bar:
            rows = table.take(kept[j * cfg.samples_per_shard:(j + 1) * cfg.samples_per_shard])
            d = rows.select(["shard", "index", "key"]).to_pydict()
            written += write_shard(cfg, j, list(zip(d["shard"], d["index"], d["key"])), cache)
    _barrier("oq2vl-curate-written")

    counts = np.bincount(codes[codes >= 0], minlength=len(REASONS))
    unreadable = pc.value_counts(table["status"].filter(pc.not_equal(table["status"], "ok"))).to_pylist()
    stats = {
        "samples_in": int(len(codes)), "kept": int(len(kept)),
        "dropped": {REASONS[i]: int(c) for i, c in enumerate(counts) if i and c},
        "unreadable": dict(sorted((u["values"], int(u["counts"])) for u in unreadable)),
        "bad_shards": bad_shards, "selectors": tallies, "scores": _score_summary(cols, cfg.mlm_column),
        "output_shards": int(n_out), "samples_per_shard": cfg.samples_per_shard,
        "selection": {"keep_uids": list(cfg.keep_uids), "drop_uids": list(cfg.drop_uids),
                      "mlm_min": cfg.mlm_min, "metric": cfg.metric if cols.mlm is not None else None,
                      "siglip_min": cfg.siglip_min, "dedup": cfg.dedup},
        "input_shards": len(units),
    }
    stats["dropped"] = dict(sorted(stats["dropped"].items()))
    assert stats["kept"] + sum(stats["dropped"].values()) + sum(stats["unreadable"].values()) == stats["samples_in"]
    if pid == 0:
        _remove_stale(cfg.out, n_out, {u.name for u in units})
        _write_json(os.path.join(cfg.out, "stats.json"), stats)
    dt = time.perf_counter() - t0
    log.info("kept %d/%d samples in %d shards (%d rewritten); dropped %s; unreadable %s; bad shards %d; "
             "%.1fs", stats["kept"], stats["samples_in"], n_out, written, stats["dropped"],
             stats["unreadable"], len(bad_shards), dt)
    return stats


def _empty_table(columns: list[str]):
    import pyarrow as pa

    return pa.table({name: pa.array([], type=_arrow_type(name)) for name in TABLE_COLUMNS + columns})


def _remove_stale(out: str, n_shards: int, units: set[str]) -> None:
    """Output shards past this run's count (an earlier run kept more) would be packed too, and tables
    of input shards no longer given would confuse a reader of DIR/scores: both removed."""
    folder = os.path.join(out, "shards")
    for f in sorted(os.listdir(folder)):
        stem, _, ext = f.partition(".")
        if ext in ("tar", "json") and stem.isdigit() and int(stem) >= n_shards:
            os.remove(os.path.join(folder, f))
    folder = os.path.join(out, "scores")
    for f in sorted(os.listdir(folder)):
        stem, _, ext = f.rpartition(".")
        if ext in ("parquet", "json") and stem not in units:
            os.remove(os.path.join(folder, f))


def main(argv=None) -> int:
    p = cli.parser("python -m oq2vl_jax.data.curate", __doc__)
    p.add_argument("--input", nargs="+", required=True,
                   help="WebDataset shards; brace patterns ({00000..00099}, {a,b}) and globs (quote them)")
    cli.add_out(p, help="output directory: shards/, scores/, scores.parquet, stats.json")
    g = p.add_argument_group("selectors (a sample is kept when any of those given accepts it)")
    g.add_argument("--keep-uids", action="append", default=[], metavar="FILE",
                   help="uid list (.npy u8,u8 pairs as DataComp/DFN, or text); repeatable, united")
    g.add_argument("--min", type=float, dest="mlm_min",
                   help="keep MLM-Filter scores >= this (the paper: 85 with --metric su)")
    g.add_argument("--siglip-min", type=float, help="keep SigLIP image-text cosines >= this")
    g = p.add_argument_group("scores")
    g.add_argument("--mlm-filter", metavar="CHECKPOINT",
                   help="MLM-Filter converted by tools/convert/hf_to_jax.py --llava (without --min: scores only)")
    g.add_argument("--metric", default="su", help="itm | odf | ctq | su (default su)")
    g.add_argument("--max-new-tokens", type=int, default=2, help="MLM-Filter generation length (original: 2)")
    g.add_argument("--siglip-score", metavar="SIGLIP_DIR", dest="siglip",
                   help="SigLIP converted by tools/convert/hf_to_jax.py --siglip (without --siglip-min: scores only)")
    g.add_argument("--scores", metavar="FILE", help="take scores from an earlier DIR/scores.parquet")
    g.add_argument("--batch-size", type=int, default=64, help="scoring rows per step, split over local devices")
    g.add_argument("--chunk", type=int, default=512, help="samples decoded and scored together")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="threads decoding, hashing and resizing images (default: all cores)")
    cli.add_dtype(p, help="scoring dtype (default: the checkpoint's)")
    g = p.add_argument_group("exclusions")
    g.add_argument("--drop-uids", action="append", default=[], metavar="FILE", help="uids never kept; repeatable")
    g.add_argument("--dedup", action="store_true", help="drop exact repeats of an earlier kept sample (pixels, uid)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--allow-missing", action="store_true",
                   help="curate the shards a brace pattern names that exist, even if some are missing")
    args = p.parse_args(argv)

    def body():
        from oq2vl_jax.train import init_distributed

        init_distributed()  # several processes (SLURM, JAX_COORDINATOR_ADDRESS): input shards are split
        cfg = CurateConfig(out=args.out, samples_per_shard=args.samples_per_shard, mlm_filter=args.mlm_filter,
                           metric=args.metric, mlm_min=args.mlm_min, max_new_tokens=args.max_new_tokens,
                           siglip=args.siglip, siglip_min=args.siglip_min, scores=args.scores,
                           keep_uids=tuple(args.keep_uids), drop_uids=tuple(args.drop_uids), dedup=args.dedup,
                           batch_size=args.batch_size, dtype=args.dtype, chunk=args.chunk, workers=args.workers)
        for flag, path in (("--mlm-filter", cfg.mlm_filter), ("--siglip-score", cfg.siglip), ("--scores", cfg.scores)):
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"{flag} {path!r} does not exist")
        run(cfg, readers.resolve_inputs(args.input, args.allow_missing))

    return cli.run(body, args)


if __name__ == "__main__":
    sys.exit(main())
