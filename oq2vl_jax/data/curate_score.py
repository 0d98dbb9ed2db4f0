"""The curator's pass 1: one table per input shard (uid, readability, pixel hash, scores) and its marker.

See oq2vl_jax/data/curate.py for the whole run; the config type is its CurateConfig.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from oq2vl_jax import cli
from oq2vl_jax.data import readers
from oq2vl_jax.data.curate_select import uid_pair
from oq2vl_jax.data.pack import _input_signature
from oq2vl_jax.data.samples import SampleError

if TYPE_CHECKING:
    from oq2vl_jax.data.curate import CurateConfig

# Per-sample columns of the scores tables (then the score columns, then `decision` in scores.parquet).
# uid_hi/uid_lo: the uid as 128-bit halves (null without a valid uid); pixel_hash: 16 bytes.
TABLE_COLUMNS = ["shard", "index", "key", "uid", "uid_hi", "uid_lo", "status", "pixel_hash"]
SCORES_VERSION = 1  # bumped when the per-shard table changes: scored shards are redone


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


class TarSamples:
    """A shard's (key, files) samples, streamed by readers.iter_tar; after the loop, `error` holds the
    read error that ended it early (None for a whole tar)."""

    def __init__(self, path: str):
        self.path, self.error = path, None

    def __iter__(self):
        self.error = yield from readers.iter_tar(self.path)


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

    tar = TarSamples(path)
    samples = iter(tar)
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

    index = 0
    while chunk := list(itertools.islice(samples, cfg.chunk)):  # decoded images of one chunk in memory
        for (key, files), (status, image, caption, pixel_hash) in zip(chunk, scorers.map(_inspect, chunk)):
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
            index += 1
        if len(pending) >= cfg.chunk:
            flush()
    flush()
    _write_parquet(table_path, cols)
    done = {**expect, "complete": tar.error is None, "samples": index, "shard_error": tar.error,
            "bytes": os.path.getsize(table_path)}
    _write_json(marker, done)
    return {**done, "reused": False}
