"""Grain loaders over packed ArrayRecord rows (see records.py and pack.py).

Training pipeline, per source: ArrayRecordDataSource → seeded shuffle → infinite repeat (reshuffled
every epoch). Sources are mixed by weight with ``MapDataset.mix`` into one global row stream, the same
on every process; process p of P takes part p of each block of batch_size * P rows, so processes never
share a row and the global batch is the same whatever P is (a run on 2 hosts of 4 devices sees exactly
the batches of a run on 1 host of 8). Everything before batching is index based, so the iterator
state is a few integers and a restored iterator yields exactly the batches the uninterrupted one would.
Decoding (record + JPEG/PNG → float32 in [-1, 1]) is a Grain ``map``, run in ``num_workers`` worker
processes via ``mp_prefetch`` (threads when num_workers=0). Rows are batched before the workers, so
the batches do not depend on ``num_workers`` (the iterator state's form does: a resume must keep it).

Batches (B = batch_size per process, L = seq_len, M = max_images):
  input_ids, segment_ids, positions, loss_mask: int32[B, L]
  images float32[B, M, H, W, 3] in [-1, 1] (or uint8 [0, 255] with image_dtype="uint8": 4x less to
  copy out of workers and onto the device; the model normalises uint8 images itself),
  image_mask bool[B, M], image_segment_ids int32[B, M] (0 = empty slot)
  corrupt int32[B]: damaged records/images met in the row (0 normally; see RowDecoder)
Images fill the slots in placeholder order, so slot j feeds the j-th run of image-pad tokens of the row.
The train iterator's state names the data it indexes (batch, processes, seed, sources and their files
and rows); restoring it into a loader built differently is refused.
With `qwen2_vl` set (model.arch qwen2_vl) rows decode by qwen2_vl_rows.Qwen2VLRowDecoder instead:
positions int32[B, 3, L], patches float32[B, P, 588], patch_segment_ids int32[B, P], patch_positions
int32[B, P, 2] (P = max_patches) in place of images/image_segment_ids.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os

import numpy as np

from oq2vl_jax.cli import UserError
from oq2vl_jax.data.records import decode_row
from oq2vl_jax.images import normalize, to_rgb8

MODES = ("packed", "unpacked_sft")
SAMPLERS = ("shuffle", "modality_length")


class DataStateMismatch(UserError, ValueError):
    """A saved train-iterator state restored into a loader that reads the data differently."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    sources: tuple[tuple[str, float], ...]  # (dir | glob of *.array_record, weight)
    batch_size: int  # rows per process
    seq_len: int
    max_images: int  # image slots per row
    image_size: int
    seed: int = 0
    num_workers: int = 0
    shuffle: bool = True
    mode: str = "packed"  # "packed" | "unpacked_sft" (packed with --packing none: one conversation a row)
    read_threads: int = 4  # per process (or per worker) decode threads
    worker_buffer_size: int = 2  # batches buffered per worker
    image_dtype: str = "float32"  # "float32" (normalised here) | "uint8" (normalised on the device)
    image_tokens: int | None = None  # the model's tokens per image; checked against the packed data
    # unpacked_sft only: "modality_length" orders rows as the original's SplitModalitySampler (each
    # global batch one modality, length-grouped into parts of `group_rows` rows; sampler.py).
    sampler: str = "shuffle"
    group_rows: int = 2  # the original's per-GPU batch: the parts rows are length-grouped into
    # Qwen2-VL: its vision config (resize bounds), patches per row and image placeholder id.
    qwen2_vl: object | None = None
    max_patches: int = 0
    image_token_id: int = 0

    def __post_init__(self):
        if self.image_dtype not in ("float32", "uint8"):
            raise ValueError(f"LoaderConfig.image_dtype must be 'float32' or 'uint8', got {self.image_dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"LoaderConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"LoaderConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "modality_length" and self.mode != "unpacked_sft":
            raise ValueError("sampler='modality_length' orders unpacked SFT rows; it needs mode='unpacked_sft'")
        if not self.sources:
            raise ValueError("LoaderConfig.sources is empty")
        for src in self.sources:
            if len(src) != 2 or float(src[1]) < 0:
                raise ValueError(f"each source must be (path_or_glob, weight >= 0), got {src!r}")


def resolve_source(path: str) -> list[str]:
    """The row files of a source, sorted for determinism: a packer output directory (exactly the
    units its stats.json lists), another directory (all ``*.array_record`` inside, recursively) or
    a glob."""
    units = (pack_stats(path) or {}).get("units") if os.path.isdir(path) else None
    if units is not None:
        files = [os.path.join(path, name + ".array_record") for name, u in units.items() if u["rows"]]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"data source {path!r}: stats.json lists {missing[0]}, which is missing")
    elif os.path.isdir(path):
        files = glob.glob(os.path.join(path, "**", "*.array_record"), recursive=True)
    else:
        files = glob.glob(path)
    files = sorted(files)
    if not files:
        raise FileNotFoundError(f"data source {path!r} has no .array_record files")
    return files


def pack_stats(path: str) -> dict | None:
    """The stats.json written by the packer beside a source's shards, if any."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    p = os.path.join(d, "stats.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    if glob.glob(os.path.join(glob.escape(d), "*.stats.json")):
        raise FileNotFoundError(f"data source {path!r}: packer unit markers but no stats.json, so a pack "
                                f"run into {d!r} did not finish; re-run it")
    return None


def row_decoder(cfg: LoaderConfig):
    """The Grain map that decodes this loader's rows."""
    one = cfg.mode == "unpacked_sft"
    if cfg.qwen2_vl is not None:
        from oq2vl_jax.data.qwen2_vl_rows import Qwen2VLRowDecoder

        return Qwen2VLRowDecoder(cfg.seq_len, cfg.max_images, cfg.max_patches, cfg.qwen2_vl, cfg.image_token_id, one)
    return RowDecoder(cfg.seq_len, cfg.max_images, cfg.image_size, one, cfg.image_dtype)


def _check_source(cfg: LoaderConfig, path: str) -> None:
    """Fails early with a clear message when packing settings and loader settings disagree."""
    from oq2vl_jax.resolve import check_qwen2_vl_source, check_source

    st = pack_stats(path)
    if st is None:
        return
    if cfg.qwen2_vl is not None or st["mode"].startswith("qwen2vl"):
        check_qwen2_vl_source(st, path, seq_len=cfg.seq_len, max_images=cfg.max_images, max_patches=cfg.max_patches,
                              vision=cfg.qwen2_vl, unpacked=cfg.mode == "unpacked_sft")
        return
    check_source(st, path, seq_len=cfg.seq_len, image_size=cfg.image_size, max_images=cfg.max_images,
                 image_tokens=cfg.image_tokens, unpacked=cfg.mode == "unpacked_sft")


# Pack-time switches that the data config names too (config.DataConfig); see README "Fidelity".
PACK_SWITCHES = ("image_strategy", "alpha", "pre_squash", "pad_as_target", "original_image_offset")


class PackSettingsMismatch(UserError, ValueError):
    """Packed data made with other pack-time switches than the data config names."""


def check_pack_switches(paths, expected: dict) -> None:
    """Each packed source was made with the switches of `expected` (read from its stats.json; data
    packed before a switch existed are not checked for it)."""
    for path in paths:
        made = ((pack_stats(path) or {}).get("config") or {}) if os.path.isdir(path) else {}
        diff = [f"{k}: packed {made[k]!r}, config {v!r}" for k, v in expected.items() if k in made and made[k] != v]
        if diff:
            raise PackSettingsMismatch(f"{path} was packed with other switches than data.*: {'; '.join(diff)}; "
                                       f"repack or set them in the config")


def check_sources(cfg: LoaderConfig) -> None:
    """Every source has rows and agrees with the loader settings; for sources read only later (eval),
    so a bad path fails at start-up, not after hours of training."""
    for path, _ in cfg.sources:
        resolve_source(path)
        _check_source(cfg, path)


class RowDecoder:
    """Grain map: row record bytes → fixed-shape numpy dict (runs in worker processes).

    Damaged data is not fatal: a record that does not decode becomes an all-padding row, and an image
    that does not decode leaves its slot empty with its sample's loss masked out; either is counted in
    the row's ``corrupt``. Rows that disagree with the loader settings still raise (a config error)."""

    def __init__(self, seq_len: int, max_images: int, image_size: int, one_sample: bool,
                 image_dtype: str = "float32"):
        self.seq_len, self.max_images, self.image_size = seq_len, max_images, image_size
        self.one_sample = one_sample
        self.uint8 = image_dtype == "uint8"

    def __call__(self, data: bytes) -> dict:
        from PIL import Image

        try:
            row = decode_row(data)
        except Exception:  # noqa: BLE001 (a damaged record: bad magic, header, sizes)
            return self.empty(corrupt=1)
        if len(row["input_ids"]) != self.seq_len:
            raise ValueError(f"row has length {len(row['input_ids'])}, loader seq_len={self.seq_len}")
        n_img = len(row["image_segment_ids"])
        if n_img > self.max_images:
            raise ValueError(f"row has {n_img} images but the loader has max_images={self.max_images} slots; "
                             f"repack with --max-images {self.max_images} or raise max_images")
        if self.one_sample and row["segment_ids"].max(initial=0) > 1:
            raise ValueError("mode='unpacked_sft' got a row holding several samples; pack with --packing none")
        s = self.image_size
        images = np.zeros((self.max_images, s, s, 3), np.uint8 if self.uint8 else np.float32)
        offsets = row["image_offsets"]
        blob = row["image_bytes"].tobytes()
        loss_mask = row["loss_mask"].astype(np.int32)
        corrupt = 0
        for i in range(n_img):
            try:
                with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]])) as im:
                    px = np.asarray(to_rgb8(im))
            except Exception:  # noqa: BLE001 (PIL raises many types); the sample is not trained on
                corrupt += 1
                loss_mask[row["segment_ids"] == row["image_segment_ids"][i]] = 0
                continue
            if px.shape != (s, s, 3):
                raise ValueError(f"stored image {i} is {px.shape[:2]}, loader image_size={s}")
            images[i] = px if self.uint8 else normalize(px)
        image_seg = np.zeros(self.max_images, np.int32)
        image_seg[:n_img] = row["image_segment_ids"]
        return {
            "input_ids": row["input_ids"], "segment_ids": row["segment_ids"], "positions": row["positions"],
            "loss_mask": loss_mask, "images": images,
            "image_mask": np.arange(self.max_images) < n_img, "image_segment_ids": image_seg,
            "corrupt": np.int32(corrupt),
        }

    def empty(self, pad_id: int = 0, corrupt: int = 0) -> dict:
        """An all-padding row (loss_mask 0) used to fill the last eval batches to a fixed shape."""
        s, m = self.image_size, self.max_images
        z = np.zeros(self.seq_len, np.int32)
        return {"input_ids": z + pad_id, "segment_ids": z, "positions": z, "loss_mask": z,
                "images": np.zeros((m, s, s, 3), np.uint8 if self.uint8 else np.float32), "image_mask": np.zeros(m, bool),
                "image_segment_ids": np.zeros(m, np.int32), "corrupt": np.int32(corrupt)}


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _source(path: str, files: list[str] | None = None):
    import grain

    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files or resolve_source(path)))


def _open_sources(cfg: LoaderConfig) -> dict[int, tuple[list[str], object]]:
    """{index in cfg.sources: (row files, MapDataset)} of the sources read (weight > 0), checked;
    opened once for both the dataset and the iterator's layout."""
    opened = {}
    for k, (path, weight) in enumerate(cfg.sources):
        if float(weight) == 0:
            continue
        _check_source(cfg, path)
        files = resolve_source(path)
        ds = _source(path, files)
        if len(ds) == 0:  # repeat() of nothing would end the "infinite" stream at once (bare StopIteration)
            raise ValueError(f"data source {path!r} has no rows")
        opened[k] = (files, ds)
    if not opened:
        raise ValueError("all sources have weight 0")
    return opened


class _ProcessRows:
    """Global row index of this process's j-th row: global batches are consecutive blocks of
    batch_size * process_count rows, and process p takes block part p. Every process walks the same
    global stream, so the global batch does not depend on the number of processes."""

    def __init__(self, rows: int, process_index: int, process_count: int):
        self.rows, self.pi, self.pc = rows, process_index, process_count

    def __call__(self, j: int) -> int:
        return (j // self.rows) * self.rows * self.pc + self.pi * self.rows + j % self.rows


class _Take:
    def __init__(self, ds):
        self.ds = ds

    def __call__(self, i: int):
        return self.ds[i]


def _finish(cfg: LoaderConfig, ds, drop_remainder: bool):
    import grain

    # Batch while still index based: an element is then a whole batch, so worker w of W builds batches
    # w, w+W, ... and the stream is the same for every W (batching after the workers would have each
    # worker batch its own every-W-th rows, dropping each worker's remainder).
    ds = ds.batch(cfg.batch_size, drop_remainder=drop_remainder)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=8))
    if cfg.num_workers > 0:
        from absl import flags

        # Grain's worker processes read absl flags; outside absl.app nothing parses them, and
        # mp_prefetch then fails with UnparsedFlagAccessError. Defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return iter(ds)


def row_info(files: list[str]) -> np.ndarray:
    """int32 [rows, 2] (real tokens, images) of the rows of `files`, in Grain's index order, from the
    packer's ``.rowinfo.npy`` beside each file."""
    out = []
    for f in files:
        p = f[: -len(".array_record")] + ".rowinfo.npy"
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} is missing: sampler='modality_length' needs the row lengths the "
                                    f"packer writes beside its rows; repack {os.path.dirname(f)!r}")
        out.append(np.load(p))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int32)


def _modality_length_rows(cfg: LoaderConfig, opened, process_count: int):
    import sys

    import grain

    from oq2vl_jax.data.sampler import EpochOrder

    if len(opened) != 1:
        raise ValueError("sampler='modality_length' reads one source (weights would mix its batches)")
    ((files, ds),) = opened.values()
    info = row_info(files)
    if len(info) != len(ds):
        raise ValueError(f"row lengths beside {files[0]!r} list {len(info)} rows, the files hold {len(ds)}; repack")
    global_batch = cfg.batch_size * process_count
    if global_batch % cfg.group_rows:
        raise ValueError(f"global batch {global_batch} is not a multiple of group_rows={cfg.group_rows}")
    order = EpochOrder(info[:, 1] > 0, info[:, 0], global_batch, global_batch // cfg.group_rows,
                       cfg.seed * 1_000_003 % 2**32)
    return grain.MapDataset.range(sys.maxsize).map(order).map(_Take(ds))


def make_train_dataset(cfg: LoaderConfig, *, process_index=None, process_count=None, opened=None):
    """The infinite, mixed, shuffled, decoded (unbatched) ``grain.MapDataset`` of rows."""
    import grain

    pi, pc = _process(process_index, process_count)
    if cfg.sampler == "modality_length":
        ds = _modality_length_rows(cfg, opened or _open_sources(cfg), pc)
        if pc > 1:
            ds = grain.MapDataset.range(len(ds) // pc).map(_ProcessRows(cfg.batch_size, pi, pc)).map(_Take(ds))
        return ds.map(RowDecoder(cfg.seq_len, cfg.max_images, cfg.image_size, True, cfg.image_dtype))
    parts, weights = [], []
    for k, (_, ds) in (opened or _open_sources(cfg)).items():
        if cfg.shuffle:
            # A distinct stream per source; k is spaced widely because Grain reshuffles epoch e with
            # seed + e, and seed + k would make source k's epoch e+1 source k+1's epoch e.
            ds = ds.shuffle(seed=(cfg.seed * 1_000_003 + k * 1_000_000_007) % 2**32)
        parts.append(ds.repeat(None))
        weights.append(float(cfg.sources[k][1]))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    if pc > 1:
        ds = grain.MapDataset.range(len(ds) // pc).map(_ProcessRows(cfg.batch_size, pi, pc)).map(_Take(ds))
    return ds.map(row_decoder(cfg))


def data_layout(cfg: LoaderConfig, process_index: int, process_count: int, opened=None) -> dict:
    """What a train iterator position means: the same index in a loader that differs in any of these
    reads other rows."""
    opened = opened or _open_sources(cfg)
    sources = []
    for k, (path, weight) in enumerate(cfg.sources):
        if k not in opened:  # weight 0: not read
            sources.append({"path": path, "weight": 0.0})
            continue
        files, ds = opened[k]
        sources.append({"path": path, "weight": float(weight), "files": [os.path.basename(f) for f in files],
                        "rows": len(ds)})
    layout = {"batch_size": cfg.batch_size, "process_index": process_index, "process_count": process_count,
              "seed": cfg.seed, "shuffle": cfg.shuffle, "num_workers": cfg.num_workers, "sources": sources}
    if cfg.sampler != "shuffle":  # absent for the default, so states saved before the option still match
        layout["sampler"] = [cfg.sampler, cfg.group_rows]
    return layout


def _checked_iterator_class():
    import grain

    class CheckedIterator(grain.DatasetIterator):
        """The Grain iterator, with a state that carries the data layout and is refused elsewhere."""

        def __init__(self, it, layout: dict):
            super().__init__(it)
            self._it, self.layout = it, layout

        def __next__(self):
            return next(self._it)

        def get_state(self) -> dict:
            return {"layout": self.layout, "iterator": self._it.get_state()}

        def set_state(self, state: dict) -> None:
            saved = json.loads(json.dumps(state["layout"]))
            if saved != json.loads(json.dumps(self.layout)):
                diff = sorted(k for k in set(saved) | set(self.layout) if saved.get(k) != self.layout.get(k))
                raise DataStateMismatch(
                    f"data iterator state was saved by a loader that reads the data differently "
                    f"({', '.join(diff)} differ): saved {saved}, this loader {self.layout}; "
                    f"restoring it would yield other batches than the saved run's")
            self._it.set_state(state["iterator"])

    return CheckedIterator


def make_train_iterator(cfg: LoaderConfig, *, process_index=None, process_count=None):
    """Infinite iterator of fixed-shape batches; a ``grain.DatasetIterator`` (get_state / set_state)."""
    pi, pc = _process(process_index, process_count)
    opened = _open_sources(cfg)
    ds = make_train_dataset(cfg, process_index=pi, process_count=pc, opened=opened)
    return _checked_iterator_class()(_finish(cfg, ds, drop_remainder=True), data_layout(cfg, pi, pc, opened))


def make_eval_iterator(cfg: LoaderConfig, *, process_index=None, process_count=None, pad_id: int = 0):
    """One pass over all sources in order (weights ignored), no shuffle, no repeat.

    Every process yields the same number of batches (ceil(rows / processes / batch_size)); the tail is
    filled with all-padding rows (loss_mask 0, image_mask False), so multi-host eval steps stay in lockstep.
    """
    import grain

    pi, pc = _process(process_index, process_count)
    parts = []
    for path, _ in cfg.sources:
        _check_source(cfg, path)
        parts.append(_source(path))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    total = len(ds)
    per_process = -(-total // pc)
    n_batches = -(-per_process // cfg.batch_size)
    decoder = row_decoder(cfg)
    mine = ds[pi::pc]
    empty = decoder.empty(pad_id)

    def get(i):
        return decoder(mine[i]) if i < len(mine) else empty

    padded = grain.MapDataset.range(n_batches * cfg.batch_size).map(get)
    return _finish(cfg, padded, drop_remainder=True)
