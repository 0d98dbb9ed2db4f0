"""Curates image-text WebDataset shards before packing: MLM-Filter / SigLIP scores, uid lists, dedup.

    python -m oq2vl_jax.data.curate --input 'shards/{00000..00099}.tar' --out DIR \\
        --mlm-filter checkpoints/mlm-filter --metric su --min 85 --keep-uids dfn_top20m.npy --dedup

Open-Qwen2VL's DataComp filter is the command above: MLM-Filter semantic-understanding score >= 85,
united with the DFN top-20M uid list. Which samples are kept, and the drop reasons, are documented in
oq2vl_jax/data/curate_select.py; in short: readable, not in any --drop-uids list, accepted by at least
one selector (--keep-uids, --min, --siglip-min; none given = all), and with --dedup not an exact
repeat (decoded pixels, then uid) of an earlier kept sample.

Three passes:
  1. score: each input shard is read (data/readers.read_tar), every sample's uid, caption and decoded
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

import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import time

import numpy as np

from oq2vl_jax import cli
from oq2vl_jax.data import readers
from oq2vl_jax.data.curate_select import REASONS, U128, Columns, Selection, decide, load_uid_list, uid_pair
from oq2vl_jax.data.pack import _input_signature, make_units
from oq2vl_jax.data.samples import SampleError

log = logging.getLogger("oq2vl_jax.curate")
# Per-sample columns of the scores tables (then the score columns, then `decision` in scores.parquet).
# uid_hi/uid_lo: the uid as 128-bit halves (null without a valid uid); pixel_hash: 16 bytes.
TABLE_COLUMNS = ["shard", "index", "key", "uid", "uid_hi", "uid_lo", "status", "pixel_hash"]
SCORES_VERSION = 1  # bumped when the per-shard table changes: scored shards are redone
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
# Pass 1: per-shard tables
# --------------------------------------------------------------------------------------------------

def _uid(files: dict[str, bytes]) -> str | None:
    """DataComp keeps the uid in each sample's json; a missing or bad json just means no uid."""
    if "json" not in files:
        return None
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return uid if isinstance(uid, str) else None


def _decode(data: bytes):
    """(RGB PIL image, 128-bit hash of its size and pixels); raises SampleError if corrupt."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
            rgb.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    h = hashlib.blake2b(f"{rgb.width}x{rgb.height}:".encode(), digest_size=16)
    h.update(rgb.tobytes())
    return rgb, h.digest()


def _inspect(sample: tuple[str, dict[str, bytes]]):
    """(status, RGB image, caption, pixel hash) of one sample; status is "ok" or the unreadable reason."""
    try:
        image_bytes, caption = readers.caption_from_files(sample[1])
        image, pixel_hash = _decode(image_bytes)
    except SampleError as e:
        return e.reason, None, None, None
    return "ok", image, caption, pixel_hash


class Scorers:
    """The models a run needs, built once per process on first use, and an earlier table's columns."""

    def __init__(self, cfg: CurateConfig):
        from concurrent.futures import ThreadPoolExecutor

        self.cfg = cfg
        self._mlm = self._siglip = None
        # Image decoding, hashing and resizing release the GIL (PIL, hashlib): threads use the cores.
        self._pool = ThreadPoolExecutor(cfg.workers) if cfg.workers > 1 else None
        self.model_columns = (([cfg.mlm_column, cfg.mlm_column + "_text"] if cfg.mlm_filter else [])
                              + (["siglip"] if cfg.siglip else []))
        self.lookup = None
        if cfg.scores:
            wanted = [c for c in (cfg.mlm_column, cfg.mlm_column + "_text", "siglip") if c not in self.model_columns]
            self.lookup = ScoresLookup(cfg.scores, wanted)
            needed = ([cfg.mlm_column] if cfg.mlm_min is not None and not cfg.mlm_filter else []) + \
                     (["siglip"] if cfg.siglip_min is not None and not cfg.siglip else [])
            missing = [c for c in needed if c not in self.lookup.columns]
            if missing:
                raise cli.UserError(f"--scores {cfg.scores} has no column {missing[0]!r} for the threshold given "
                                    f"(has {self.lookup.columns or 'no score columns'})")

    def map(self, fn, items) -> list:
        return list(self._pool.map(fn, items) if self._pool else map(fn, items))

    def columns(self) -> list[str]:
        return self.model_columns + (self.lookup.columns if self.lookup else [])

    def __call__(self, path: str, rows: list[tuple[int, str]], images: list, captions: list[str]) -> dict[str, list]:
        """Score columns for readable samples (index, key) of shard `path`."""
        c, out = self.cfg, {}
        if self.lookup is not None:
            found = [self.lookup.get(path, index, key) for index, key in rows]
            out.update({col: [f[col] for f in found] for col in self.lookup.columns})
        if c.mlm_filter:
            if self._mlm is None:
                from oq2vl_jax.data.mlm_filter import MLMFilterScorer
                self._mlm = MLMFilterScorer(c.mlm_filter, c.metric, batch_size=c.batch_size,
                                            max_new_tokens=c.max_new_tokens, dtype=c.dtype)
            scored = self._mlm.score_pairs(images, captions, mapper=self.map)
            out[c.mlm_column] = [s.score for s in scored]
            out[c.mlm_column + "_text"] = [s.text for s in scored]
        if c.siglip:
            if self._siglip is None:
                from oq2vl_jax.data.siglip_score import SiglipScorer
                self._siglip = SiglipScorer(c.siglip, batch_size=c.batch_size, dtype=c.dtype)
            out["siglip"] = self._siglip.score(images, captions, mapper=self.map)
        return out


class ScoresLookup:
    """Score columns of an earlier scores table, per shard file name, by (index in the shard, key)."""

    def __init__(self, path: str, wanted: list[str]):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except (OSError, ValueError) as e:
            raise cli.UserError(f"--scores {path}: not a readable parquet table ({e})") from None
        missing = [c for c in ("shard", "index", "key") if c not in names]
        if missing:
            raise cli.UserError(f"--scores {path} has no column(s) {missing}: not a curate scores table")
        self.columns = [c for c in wanted if c in names]
        self.table = pq.read_table(path, columns=["shard", "index", "key"] + self.columns)
        enc = pc.dictionary_encode(self.table["shard"]).combine_chunks()
        ids = enc.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(ids, kind="stable")
        bounds = np.searchsorted(ids[order], np.arange(len(enc.dictionary) + 1))
        self.rows: dict[str, list[np.ndarray]] = {}  # shard file name -> row numbers in the table
        for i, shard in enumerate(enc.dictionary.to_pylist()):
            self.rows.setdefault(os.path.basename(shard), []).append(order[bounds[i]:bounds[i + 1]])
        self._unit: tuple[str, dict] | None = None

    def get(self, shard: str, index: int, key: str) -> dict:
        name = os.path.basename(shard)
        if self._unit is None or self._unit[0] != name:  # one shard's rows at a time
            rows = np.concatenate(self.rows.get(name, [np.zeros(0, np.int64)]))
            d = self.table.take(rows).to_pydict()
            self._unit = (name, {(i, k): {c: d[c][r] for c in self.columns}
                                 for r, (i, k) in enumerate(zip(d["index"], d["key"]))})
        return self._unit[1].get((index, key), {c: None for c in self.columns})


def _arrow_type(name: str):
    import pyarrow as pa

    types = {"index": pa.int64(), "siglip": pa.float64(), "uid_hi": pa.uint64(), "uid_lo": pa.uint64(),
             "pixel_hash": pa.binary(16)}
    if name in types:
        return types[name]
    return pa.int64() if name.startswith("mlm_") and not name.endswith("_text") else pa.string()


def _write_parquet(path: str, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: pa.array(values, type=_arrow_type(name)) for name, values in columns.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.table(arrays), tmp)
    os.replace(tmp, path)


def _marker_ok(marker: str, expect: dict, data_path: str) -> bool:
    try:
        with open(marker) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(done, dict) and all(done.get(k) == v for k, v in expect.items())
            and os.path.exists(data_path) and done.get("bytes") == os.path.getsize(data_path))


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def score_unit(cfg: CurateConfig, unit, scorers: Scorers) -> dict:
    """Pass 1 for one input shard: its table and marker (reused when the marker matches)."""
    (path,) = unit.inputs
    table_path = os.path.join(cfg.out, "scores", unit.name + ".parquet")
    marker = os.path.join(cfg.out, "scores", unit.name + ".json")
    expect = {"complete": True, "scorers": cfg.score_fingerprint(), "input": _input_signature([path])}
    if _marker_ok(marker, expect, table_path):
        with open(marker) as f:
            return {**json.load(f), "reused": True}
    if os.path.exists(marker):
        os.remove(marker)  # before the table changes, so an old marker never vouches for a new table

    raw, error = readers.read_tar(path)
    score_cols = scorers.columns()
    cols = {c: [] for c in TABLE_COLUMNS + score_cols}
    pending = []  # (row, image, caption) of readable samples not scored yet

    def flush():
        if not pending:
            return
        scores = scorers(path, [(row, cols["key"][row]) for row, _, _ in pending], [im for _, im, _ in pending],
                         [cap for _, _, cap in pending])
        for c, values in scores.items():
            for (row, _, _), v in zip(pending, values):
                cols[c][row] = v
        pending.clear()

    for start in range(0, len(raw), cfg.chunk):  # decoded images of one chunk at a time in memory
        inspected = scorers.map(_inspect, raw[start:start + cfg.chunk])
        for index, (key, files), (status, image, caption, pixel_hash) in zip(
                range(start, len(raw)), raw[start:start + cfg.chunk], inspected):
            uid = _uid(files)
            pair = uid_pair(uid)
            for c, v in (("shard", path), ("index", index), ("key", key), ("uid", uid),
                         ("uid_hi", pair and pair[0]), ("uid_lo", pair and pair[1]), ("status", status),
                         ("pixel_hash", pixel_hash)):
                cols[c].append(v)
            for c in score_cols:
                cols[c].append(None)
            if status == "ok" and score_cols:
                pending.append((index, image, caption))
        if len(pending) >= cfg.chunk:
            flush()
    flush()
    _write_parquet(table_path, cols)
    done = {**expect, "complete": error is None, "samples": len(raw), "shard_error": error,
            "bytes": os.path.getsize(table_path)}
    _write_json(marker, done)
    return {**done, "reused": False}


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
            if cache.get("path") != shard:  # consecutive output shards mostly share input shards
                cache.update(path=shard, samples=readers.read_tar(shard)[0])
            got_key, files = cache["samples"][index]
            if got_key != key:
                raise RuntimeError(f"{shard} changed since it was scored: sample {index} is {got_key!r}, not {key!r}")
            writer.write({"__key__": key, **files})
        writer.close()
    os.replace(tmp, tar_path)
    _write_json(marker, {"samples_sha256": digest, "count": len(rows), "bytes": os.path.getsize(tar_path)})
    return True


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
    """Curates `inputs` (resolved shard paths) into cfg.out; returns (and writes) DIR/stats.json."""
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
        run(cfg, readers.resolve_inputs(args.input))

    return cli.run(body, args)


if __name__ == "__main__":
    sys.exit(main())
