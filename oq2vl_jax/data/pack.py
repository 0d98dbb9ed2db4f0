"""Packs captions / SFT conversations / text / interleaved documents into fixed-length multimodal rows (ArrayRecord).

    python -m oq2vl_jax.data.pack --input 'shards/{00000..00099}.tar' --tokenizer DIR --out DIR \\
        --mode caption --seq-len 4096 --image-tokens 144 [--workers N]

Each input shard (or each window of ``--window`` shards) is one work unit: its samples are built
(samples.py), packed by first-fit-decreasing (ffd.py, as the original does per tar shard) and written to
``OUT/<name>.array_record`` with one row record per ArrayRecord record (records.py), then
``OUT/<name>.stats.json``. That stats file is the unit's done marker: it is written last, via rename,
and a re-run skips every unit whose marker matches the current settings and inputs. A unit that hit a
shard-level read error is not marked complete, so a re-run retries it. ``OUT/stats.json`` sums them all.

Images are stored already squashed to image_size×image_size with PIL bicubic (the tower's own
"resize-naive" transform, docs/original_system.md §1; --image-strategy letterbox / resize-crop, --alpha
and --pre-squash select the original's other paths, see transforms.py), so the loader only decodes and
normalises.
Default encoding is JPEG quality 95 with 4:4:4 chroma. Measured at 384² on synthetic images (no real
photos offline): a smooth image 47 kB vs 168 kB as PNG (mean abs error 0.65/255, PSNR 48.7 dB); a
worst-case image of fine-grained multi-scale noise 190 kB vs 347 kB (error 3.3/255, PSNR 35.7 dB).
Photos should fall in between (not measured): JPEG then costs ~1-3 grey levels of error for ~2-4× less
disk and loader read bandwidth. ``--image-format png`` stores the resized pixels losslessly, bit-exact
with the original's transform.

Every input sample is either packed into exactly one row or counted in ``skipped`` with its reason.

Qwen2-VL (``--mode qwen2vl_caption`` / ``qwen2vl_sft``, a Qwen2-VL tokenizer): each image is stored
resized as Qwen2-VL's processor resizes it (``--min-pixels``/``--max-pixels``), and a sample's length
counts its images' own token numbers ((h/28)(w/28) each, plus the vision start/end markers). Rows are
packed with a second bound, ``--max-patches`` per row (4 per image token; default 4 * seq_len), so the
loader's fixed patch rows always fit.
"""
from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from oq2vl_jax import failures, locks
from oq2vl_jax.data import readers
from oq2vl_jax.data.ffd import first_fit_decreasing
from oq2vl_jax.data import transforms
from oq2vl_jax.data.records import assemble_row, encode_row, fill_slack_as_target
from oq2vl_jax.data.samples import SampleBuilder, SampleError, Tokens, count_image_tags

MODES = ("caption", "sft", "text", "interleaved", "qwen2vl_caption", "qwen2vl_sft")
# The original's packer drops interleaved documents with 10 or more images.
MAX_DOC_IMAGES = 9
# Beside each unit's rows: int32 [rows, 2] = (real tokens, images) per row, in row order.
ROW_INFO = ".rowinfo.npy"
STATS_VERSION = 2  # bumped when the record format changes: done shards are redone


@dataclasses.dataclass(frozen=True)
class PackConfig:
    tokenizer: str
    out: str
    mode: str = "caption"
    seq_len: int = 4096
    image_tokens: int = 144
    image_size: int = 384
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    max_images: int | None = None  # per-row image cap; None → what can fit (see resolved_max_images)
    max_samples: int | None = None  # per-row sample cap (bounds segments for the cuDNN packed layout)
    sft_template: str = "chatml"
    image_root: str | None = None  # SFT: where relative image paths live (default: the json's folder)
    packing: str = "ffd"  # "ffd" or "none" (one sample per row, for unpacked SFT batches)
    text_key: str = "text"
    # Cut samples longer than seq_len to seq_len (the original truncated rows to 4096) instead of
    # skipping them as too_long; an image whose placeholders would be cut is dropped whole.
    truncate: bool = False
    # Fidelity switches (README "Fidelity"); the defaults are the corrected behaviour.
    image_strategy: str = "squash"  # squash | letterbox | resize-crop (prismatic's resize strategies)
    alpha: str = "white"  # white: composite transparency on white; drop: PIL convert("RGB") (original)
    pre_squash: str = "none"  # lanczos: the original pickle packer's LANCZOS resize first
    pad_as_target: bool = False  # the pickle path's <|pad|> filling each row's slack, trained on
    original_image_offset: bool = False  # SFT: drop the token after <image> as tokenizer_image_token
    # FFD runs over at most this many samples at a time (bounds memory for one huge input file, e.g.
    # a 10M-conversation SFT json); a shard under it is packed whole, as the original.
    max_samples_in_memory: int = 50_000
    # Qwen2-VL modes only: the processor's resize bounds and the per-row patch budget.
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    max_patches: int | None = None  # None: 4 * seq_len (every row's images fit)

    @property
    def qwen2vl(self) -> bool:
        return self.mode.startswith("qwen2vl")

    def qwen2vl_vision(self):
        from oq2vl_jax.models.config import Qwen2VLVisionConfig

        return Qwen2VLVisionConfig(min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def resolved_max_patches(self) -> int:
        return self.max_patches if self.max_patches is not None else 4 * self.seq_len

    def __post_init__(self):  # named at once, not after the first shard has been read
        for name, allowed in (("mode", MODES), ("packing", ("ffd", "none")), ("image_format", ("jpeg", "png")),
                              ("sft_template", ("chatml", "original", "plain"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, low in (("seq_len", 1), ("image_tokens", 1), ("image_size", 1), ("max_images", 0),
                          ("max_samples", 1), ("max_samples_in_memory", 1), ("min_pixels", 1), ("max_pixels", 1),
                          ("max_patches", 4)):
            v = getattr(self, name)
            if v is not None and v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        transforms.check(self.image_strategy, self.alpha, self.pre_squash)
        if self.pad_as_target and self.packing != "ffd":
            raise ValueError("pad_as_target needs packing='ffd' (the slack is one more segment of the row)")
        if self.pad_as_target and self.max_samples is not None and self.max_samples < 2:
            raise ValueError("pad_as_target needs max_samples >= 2 (the slack takes one segment)")
        if self.qwen2vl:
            if self.truncate:
                raise ValueError("truncate is not supported for the qwen2vl modes")
            self.qwen2vl_vision()  # checks min_pixels <= max_pixels

    def resolved_max_images(self) -> int:
        if self.mode == "text":
            return 0
        if self.max_images is not None:
            return self.max_images
        if self.qwen2vl:  # an image is at least vision start, one token, vision end
            return self.seq_len // 5
        # An image-bearing sample needs K image slots plus at least <s>, one text token and <|im_end|>.
        return self.seq_len // (self.image_tokens + 3)

    def fingerprint(self) -> dict:
        """Settings that change the output bytes; a done unit with a different fingerprint is redone."""
        d = dataclasses.asdict(self)
        d.pop("out")
        d["tokenizer"] = _tokenizer_hash(self.tokenizer)
        d["max_images"] = self.resolved_max_images()
        d["stats_version"] = STATS_VERSION
        if self.qwen2vl:
            d["max_patches"] = self.resolved_max_patches()
        else:  # fields the other modes never had: their done units stay done
            for k in ("min_pixels", "max_pixels", "max_patches"):
                d.pop(k)
        return d


def _tokenizer_hash(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")):
            with open(os.path.join(path, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Unit:
    name: str
    inputs: tuple[str, ...]


def make_units(inputs: list[str], window: int) -> list[Unit]:
    stems = [os.path.basename(p).split(".")[0] for p in inputs]
    dup = {s for s, c in collections.Counter(stems).items() if c > 1}
    # Same-named shards from different folders get a path hash so their outputs do not collide.
    names = [f"{s}-{hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:8]}" if s in dup else s
             for s, p in zip(stems, inputs)]
    if window <= 1:
        return [Unit(n, (p,)) for n, p in zip(names, inputs)]
    return [Unit(f"window-{names[i]}-{len(inputs[i:i + window])}", tuple(inputs[i:i + window]))
            for i in range(0, len(inputs), window)]


def _input_signature(paths) -> list:
    sig = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:  # e.g. a dangling symlink: the reader reports it as a bad shard
            sig.append([os.path.abspath(p), None, None])
            continue
        sig.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return sig


# --------------------------------------------------------------------------------------------------
# One unit
# --------------------------------------------------------------------------------------------------
_BUILDERS: dict = {}


def _builder(cfg: PackConfig) -> SampleBuilder:
    key = (cfg.tokenizer, cfg.image_tokens, cfg.sft_template, cfg.original_image_offset, cfg.pad_as_target,
           cfg.qwen2vl)
    if key not in _BUILDERS and cfg.qwen2vl:
        from oq2vl_jax.data.qwen2_vl_samples import Qwen2VLSampleBuilder
        from oq2vl_jax.data.qwen2_vl_text import load_qwen2_vl_tokenizer
        _BUILDERS[key] = Qwen2VLSampleBuilder(load_qwen2_vl_tokenizer(cfg.tokenizer))
    if key not in _BUILDERS:  # one tokenizer load per worker process
        from oq2vl_jax.data.tokenizer import add_pkl_pad, load_tokenizer
        tok = load_tokenizer(cfg.tokenizer)
        b = SampleBuilder(tok, cfg.image_tokens, cfg.sft_template, cfg.original_image_offset)
        b.slack_id = add_pkl_pad(tok) if cfg.pad_as_target else None
        _BUILDERS[key] = b
    return _BUILDERS[key]


def _image(cfg: PackConfig, data: bytes) -> bytes:
    return readers.prepare_image(data, cfg.image_size, cfg.image_format, cfg.jpeg_quality,
                                 cfg.image_strategy, cfg.alpha, cfg.pre_squash)


def _truncate(cfg: PackConfig, tokens: Tokens, image_token_id: int) -> Tokens:
    """The first seq_len tokens, minus a trailing partial image; raises if no target is left."""
    ids, mask = tokens.input_ids[:cfg.seq_len], tokens.loss_mask[:cfg.seq_len]
    where = np.flatnonzero(ids == image_token_id)
    images = len(where) // cfg.image_tokens
    if len(where) % cfg.image_tokens:  # cut inside an image's placeholders: drop that image
        ids, mask = ids[:where[images * cfg.image_tokens]], mask[:where[images * cfg.image_tokens]]
    if not mask[1:].any():
        raise SampleError("too_long", f"{len(tokens.input_ids)} tokens, no target within seq_len {cfg.seq_len}")
    return Tokens(ids, mask, images, truncated=True)


def _fit(cfg: PackConfig, b: SampleBuilder, tokens: Tokens) -> Tokens:
    """Checks a sample against the row (truncating it with cfg.truncate); raises SampleError."""
    if len(tokens.input_ids) > cfg.seq_len:
        if not cfg.truncate:
            raise SampleError("too_long", f"{len(tokens.input_ids)} tokens > seq_len {cfg.seq_len}")
        tokens = _truncate(cfg, tokens, b.ids.image)
    if cfg.qwen2vl and 4 * int(np.sum(tokens.input_ids == b.ids.image)) > cfg.resolved_max_patches():
        raise SampleError("too_many_patches", f"images of more than max_patches {cfg.resolved_max_patches()} patches")
    if tokens.num_images > cfg.resolved_max_images():
        raise SampleError("too_many_images", f"{tokens.num_images} > max_images {cfg.resolved_max_images()}")
    return tokens


def _turns_and_images(entry: dict) -> tuple[object, list[str]]:
    """(conversation turns, image paths) of a LLaVA-style record; SampleError for a bad image field
    or a count of <image> tags that differs from the images."""
    paths = entry.get("image") or []
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p and "\0" not in p for p in paths):
        raise SampleError("bad_image_field", f"image must be a path or a list of paths, got "
                                             f"{json.dumps(entry.get('image'))[:80]}")
    turns = entry.get("conversations")
    if count_image_tags(turns) != len(paths):
        raise SampleError("image_tag_mismatch", f"{count_image_tags(turns)} <image> tags vs {len(paths)} images")
    return turns, paths


def _caption_samples(path: str, build):
    """(key, tokens, images) = (key, *build(image bytes, caption)) or (key, SampleError) per sample of
    a WebDataset tar, streamed (a shard is never held whole); returns the tar's read error, if any."""
    tar = readers.iter_tar(path)
    while True:
        try:
            key, files = next(tar)
        except StopIteration as stop:
            return stop.value
        try:
            yield (key, *build(*readers.caption_from_files(files)))
        except SampleError as e:
            yield key, e


def _iter_samples(cfg: PackConfig, path: str):
    """Yields (key, tokens, encoded images) or (key, SampleError) for one input file; sets errors."""
    b = _builder(cfg)
    if cfg.qwen2vl:
        return (yield from _iter_qwen2vl(cfg, b, path))
    if cfg.mode == "caption":
        return (yield from _caption_samples(
            path, lambda image, caption: (_fit(cfg, b, b.caption(caption)), [_image(cfg, image)])))
    if cfg.mode == "interleaved":
        return (yield from _iter_interleaved(cfg, b, path))
    if cfg.mode == "text":
        raw, err = readers.read_text_docs(path, cfg.text_key)
        for key, doc in raw:
            try:
                if isinstance(doc, SampleError):
                    raise doc
                tokens = _fit(cfg, b, b.text(doc))
                yield key, tokens, []
            except SampleError as e:
                yield key, e
        return err
    errors: list = []
    root = cfg.image_root or os.path.dirname(os.path.abspath(path))
    for key, entry in readers.iter_json_records(path, errors):
        try:
            if isinstance(entry, SampleError):
                raise entry
            if not isinstance(entry, dict):
                raise SampleError("bad_conversation", "sample is not a json object")
            key = str(entry.get("id", key))
            turns, image_paths = _turns_and_images(entry)
            tokens = _fit(cfg, b, b.conversation(turns))
            images = []
            for rel in image_paths[:tokens.num_images]:  # truncation may have dropped the last ones
                images.append(_image(cfg, _image_file(root, rel)))
            yield key, tokens, images
        except SampleError as e:
            yield key, e
    return errors[0] if errors else None


def _image_file(root: str, rel: str) -> bytes:
    """The bytes of a conversation's image, relative to the image root; a missing one fails the sample."""
    try:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()
    except OSError as e:
        raise SampleError("missing_image", f"{rel}: {e}") from None


def _collect_error(gen, errors: list):
    """Yields from a reader that returns its file-level error; appends that error to `errors`."""
    err = yield from gen
    if err:
        errors.append(err)


def _iter_interleaved(cfg: PackConfig, b: SampleBuilder, path: str):
    """OBELICS-style documents: WebDataset tars of {key}.json, or .jsonl / .json lists of records."""
    errors: list = []
    if path.lower().endswith((".jsonl", ".json")):
        raw = readers.iter_json_records(path, errors)
    else:
        raw = _collect_error(readers.iter_tar(path), errors)
    for key, entry in raw:
        try:
            if isinstance(entry, SampleError):
                raise entry
            if not path.lower().endswith((".jsonl", ".json")):  # tar members {ext: bytes}
                if "json" not in entry:
                    raise SampleError("missing_json")
                entry = readers._json_or_error(entry["json"])
            parts, images = readers.interleaved_from_record(entry)
            if len(images) > MAX_DOC_IMAGES:
                raise SampleError("too_many_images", f"{len(images)} images in the document > {MAX_DOC_IMAGES}")
            tokens = _fit(cfg, b, b.interleaved(parts))
            yield key, tokens, [_image(cfg, d) for d in images[:tokens.num_images]]
        except SampleError as e:
            yield key, e
    return errors[0] if errors else None


def _iter_qwen2vl(cfg: PackConfig, b, path: str):
    """_iter_samples for the Qwen2-VL modes: images resized first, their token counts set the text."""
    from oq2vl_jax.data.qwen2_vl_images import prepare_image

    vcfg = cfg.qwen2vl_vision()

    def prepared(data):
        enc, (gh, gw) = prepare_image(data, vcfg, cfg.image_format, cfg.jpeg_quality)
        return enc, gh * gw // vcfg.spatial_merge_size**2

    if cfg.mode == "qwen2vl_caption":
        def build(image, caption):
            enc, n = prepared(image)
            return _fit(cfg, b, b.caption(caption, n)), [enc]

        return (yield from _caption_samples(path, build))
    errors: list = []
    root = cfg.image_root or os.path.dirname(os.path.abspath(path))
    for key, entry in readers.iter_json_records(path, errors):  # streamed, as the other SFT mode
        try:
            if isinstance(entry, SampleError):
                raise entry
            if not isinstance(entry, dict):
                raise SampleError("bad_conversation", "sample is not a json object")
            key = str(entry.get("id", key))
            turns, paths = _turns_and_images(entry)
            images = []
            for rel in paths:
                images.append(prepared(_image_file(root, rel)))
            tokens = _fit(cfg, b, b.conversation(turns, [n for _, n in images]))
            yield key, tokens, [enc for enc, _ in images]
        except SampleError as e:
            yield key, e
    return errors[0] if errors else None


def pack_unit(cfg: PackConfig, unit: Unit) -> dict:
    """Builds, packs and writes one unit; returns its stats (reused from disk if already done)."""
    rows_path = os.path.join(cfg.out, unit.name + ".array_record")
    info_path = os.path.join(cfg.out, unit.name + ROW_INFO)
    stats_path = os.path.join(cfg.out, unit.name + ".stats.json")
    fingerprint = cfg.fingerprint()
    inputs_sig = _input_signature(unit.inputs)
    if os.path.exists(stats_path):
        try:
            with open(stats_path) as f:
                done = json.load(f)
        except (OSError, ValueError):
            done = {}  # unreadable marker (e.g. empty after a power loss): not done
        rows_size = os.path.getsize(rows_path) if os.path.exists(rows_path) else 0
        if (isinstance(done, dict) and done.get("complete") and done.get("config") == fingerprint
                and done.get("inputs") == inputs_sig and done.get("rows_bytes") == rows_size
                and (done.get("rows") == 0 or os.path.exists(info_path))):
            done["reused"] = True
            return done
        # Not reusable: drop the marker before touching the rows, so a run killed between writing new
        # rows and their marker cannot leave an old marker vouching for the new rows.
        os.remove(stats_path)
    _invalidate_summary(cfg.out)  # this unit changes OUT

    from array_record.python.array_record_module import ArrayRecordWriter

    skipped = collections.Counter()
    skipped_keys, shard_errors, kept = [], {}, []
    pad_id, slack_id = _builder(cfg).ids.pad, _builder(cfg).slack_id
    tmp = f"{rows_path}.tmp-{os.getpid()}"
    tally = collections.Counter()  # samples_in, samples_packed, rows, real_tokens, images, truncated
    writer, max_img_row, max_seg_row = None, 0, 0
    row_info = array.array("i")  # per row: real tokens, images (the length-grouped sampler's input)

    def flush():
        """Packs and writes the samples held so far, then forgets them: memory stays bounded by
        cfg.max_samples_in_memory however large one input file is (FFD runs per batch of samples)."""
        nonlocal writer, max_img_row, max_seg_row
        lengths = [len(t.input_ids) for _, t, _ in kept]
        if cfg.packing == "ffd" and cfg.qwen2vl:  # the second bound: patches per row (4 per image token)
            image_id = _builder(cfg).ids.image
            patches = [4 * int(np.sum(t.input_ids == image_id)) for _, t, _ in kept]
            bins = first_fit_decreasing(lengths, cfg.seq_len, patches, cfg.resolved_max_patches(),
                                        max_items=cfg.max_samples)
        elif cfg.packing == "ffd":
            max_items = cfg.max_samples - 1 if cfg.pad_as_target and cfg.max_samples else cfg.max_samples
            bins = first_fit_decreasing(lengths, cfg.seq_len, [t.num_images for _, t, _ in kept],
                                        cfg.resolved_max_images(), max_items=max_items)
        else:
            bins = [[i] for i in range(len(kept))]
        if bins and writer is None:
            writer = ArrayRecordWriter(tmp, "group_size:1")
        for b in bins:
            row = assemble_row([(kept[i][1].input_ids, kept[i][1].loss_mask, kept[i][2]) for i in b],
                               cfg.seq_len, pad_id)
            if slack_id is not None:
                row = fill_slack_as_target(row, slack_id)
            writer.write(encode_row(row))
            max_img_row = max(max_img_row, len(row["image_segment_ids"]))
            max_seg_row = max(max_seg_row, int(row["segment_ids"].max(initial=0)))
            row_info.extend((int(sum(lengths[i] for i in b)), len(row["image_segment_ids"])))
        tally.update(samples_packed=len(kept), rows=len(bins), real_tokens=int(sum(lengths)),
                     images=int(sum(t.num_images for _, t, _ in kept)),
                     truncated=sum(t.truncated for _, t, _ in kept))
        kept.clear()

    from tqdm import tqdm

    try:
        # Per-unit progress (terminals only): one huge input file is one unit and may take hours.
        bar = tqdm(desc=unit.name, unit=" samples", disable=None, leave=False, mininterval=5)
        for path in unit.inputs:
            gen = _iter_samples(cfg, path)
            while True:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    if stop.value:
                        shard_errors[path] = stop.value
                    break
                bar.update()
                tally["samples_in"] += 1
                if isinstance(item[1], SampleError):
                    skipped[item[1].reason] += 1
                    skipped_keys.append([item[0], item[1].reason])
                else:
                    kept.append(item)
                    if len(kept) >= cfg.max_samples_in_memory:
                        flush()
        flush()
        bar.close()
        if writer is not None:
            writer.close()
            os.replace(tmp, rows_path)
            with open(info_path + ".tmp", "wb") as f:
                np.save(f, np.frombuffer(row_info, np.int32).reshape(-1, 2))
            os.replace(info_path + ".tmp", info_path)
    except BaseException:  # e.g. a full disk or a kill: no .tmp-<pid> left behind
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        for leftover in (tmp, info_path + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    if writer is None:
        for stale in (rows_path, info_path):  # output of an earlier run with different settings
            if os.path.exists(stale):
                os.remove(stale)

    stats = {
        "name": unit.name, "complete": not shard_errors, "config": fingerprint, "inputs": inputs_sig,
        "samples_in": tally["samples_in"], "samples_packed": tally["samples_packed"],
        "skipped": dict(sorted(skipped.items())), "rows": tally["rows"], "real_tokens": tally["real_tokens"],
        "images": tally["images"], "truncated": tally["truncated"],
        "max_images_in_row": max_img_row, "max_samples_in_row": max_seg_row,
        "shard_errors": shard_errors, "skipped_keys": skipped_keys,
        "rows_bytes": os.path.getsize(rows_path) if writer is not None else 0,
    }
    with open(stats_path + ".tmp", "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(stats_path + ".tmp", stats_path)
    stats["reused"] = False
    return stats


def _worker(args):
    return pack_unit(*args)


# --------------------------------------------------------------------------------------------------
# Whole run
# --------------------------------------------------------------------------------------------------
def summarize(cfg: PackConfig, unit_stats: list[dict], token_ids: dict | None = None) -> dict:
    skipped = collections.Counter()
    for s in unit_stats:
        skipped.update(s["skipped"])
    rows = sum(s["rows"] for s in unit_stats)
    real = sum(s["real_tokens"] for s in unit_stats)
    fp = cfg.fingerprint()
    return {
        "mode": cfg.mode, "seq_len": cfg.seq_len, "image_tokens": cfg.image_tokens,
        "image_size": cfg.image_size, "image_format": cfg.image_format, "max_images": fp["max_images"],
        "packing": cfg.packing, "config": fp, "tokenizer": token_ids or {},
        **({"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "max_patches": fp["max_patches"]}
           if cfg.qwen2vl else {}),
        "samples_in": sum(s["samples_in"] for s in unit_stats),
        "samples_packed": sum(s["samples_packed"] for s in unit_stats),
        "skipped": dict(sorted(skipped.items())), "rows": rows, "real_tokens": real,
        "fill_rate": real / (rows * cfg.seq_len) if rows else 0.0,
        "images": sum(s["images"] for s in unit_stats),
        "truncated": sum(s.get("truncated", 0) for s in unit_stats),
        "max_images_in_row": max((s["max_images_in_row"] for s in unit_stats), default=0),
        "max_samples_in_row": max((s["max_samples_in_row"] for s in unit_stats), default=0),
        "bad_shards": {p: e for s in unit_stats for p, e in s["shard_errors"].items()},
        "units": {s["name"]: {k: s[k] for k in ("samples_in", "samples_packed", "skipped", "rows",
                                                "real_tokens", "images")} for s in unit_stats},
    }


def _invalidate_summary(out: str) -> None:
    """Removes OUT/stats.json before OUT changes: until the run writes a new one, OUT holds a mix of
    old and new units, which the loader refuses (unit markers without a summary). A re-run that
    reuses every unit leaves it in place, so a trainer reading OUT meanwhile is not disturbed."""
    try:
        os.remove(os.path.join(out, "stats.json"))
    except FileNotFoundError:
        pass


def _remove_stale(out: str, names: set[str], log) -> None:
    """Deletes unit outputs of earlier runs into `out` that this run's units do not include (other
    inputs or another --window); left there, the loader would read their rows as well."""
    for f in sorted(os.listdir(out)):
        for suffix in (".array_record", ".stats.json", ROW_INFO):
            if f.endswith(suffix) and f != "stats.json" and f[: -len(suffix)] not in names:
                _invalidate_summary(out)
                os.remove(os.path.join(out, f))
                log(f"removed {f}: output of an earlier run, not a unit of this one")


def _remove_leftover_tmp(out: str, log) -> None:
    """Temporary files of a killed run into `out` (only called while holding its lock)."""
    for f in sorted(os.listdir(out)):
        if ".tmp-" in f or f.endswith(".tmp"):
            os.remove(os.path.join(out, f))
            log(f"removed {f}: left by an interrupted run")


def run(cfg: PackConfig, inputs: list[str], window: int = 1, workers: int = 1, log=print) -> dict:
    """Packs ``inputs`` (already resolved paths) into ``cfg.out``; returns and writes OUT/stats.json.
    OUT is locked meanwhile: a second packer into it is refused, naming this one."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    with failures.writing(cfg.out):
        os.makedirs(cfg.out, exist_ok=True)
        with locks.hold(cfg.out, "a pack run"):
            _remove_leftover_tmp(cfg.out, log)
            return _run(cfg, inputs, window, workers, log)


def _run(cfg: PackConfig, inputs: list[str], window: int, workers: int, log) -> dict:
    from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids

    if cfg.qwen2vl:  # Qwen2-VL's tokenizer as it ships
        q = _builder(cfg).ids
        token_ids = {"image_token_id": q.image, "vocab_len": q.vocab_len, "vision_start": q.vision_start,
                     "vision_end": q.vision_end, "eos": q.im_end, "pad": q.pad}
    else:
        ids = special_ids(load_tokenizer(cfg.tokenizer))  # recorded so training can derive them from the data
        token_ids = {"image_token_id": ids.image, "vocab_len": ids.vocab_len, "bos": ids.bos, "eos": ids.eos,
                     "pad": ids.pad}
    units = make_units(inputs, window)
    jobs = [(cfg, u) for u in units]
    t0 = time.perf_counter()
    results = []
    if workers <= 1:
        it = map(_worker, jobs)
        pool = None
    else:
        # spawn: the tokenizers library's threads do not survive fork safely.
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
        it = pool.imap(_worker, jobs)
    try:
        for i, s in enumerate(it, 1):
            results.append(s)
            tag = "reused" if s["reused"] else "packed"
            err = f" SHARD ERROR {s['shard_errors']}" if s["shard_errors"] else ""
            log(f"[{i}/{len(units)}] {s['name']}: {tag}, {s['samples_packed']}/{s['samples_in']} samples, "
                f"{s['rows']} rows, skipped {s['skipped']}{err}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _remove_stale(cfg.out, {u.name for u in units}, log)
    stats = summarize(cfg, results, token_ids)
    with open(os.path.join(cfg.out, "stats.json.tmp"), "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(os.path.join(cfg.out, "stats.json.tmp"), os.path.join(cfg.out, "stats.json"))
    dt = time.perf_counter() - t0
    log(f"done: {stats['samples_packed']}/{stats['samples_in']} samples in {stats['rows']} rows, fill "
        f"{stats['fill_rate']:.4f}, skipped {stats['skipped']}, bad shards {len(stats['bad_shards'])}, "
        f"{dt:.1f}s ({stats['samples_in'] / max(dt, 1e-9):.0f} samples/s)")
    return stats


# Flags that override config keys (a flag left out keeps the config's value).
FLAG_KEYS = {"seq_len": "data.seq_len", "image_tokens": "model.image_tokens", "image_size": "model.vision.image_size",
             "max_images": "data.max_images", "mode": "pack.mode", "image_format": "pack.image_format",
             "jpeg_quality": "pack.jpeg_quality", "max_samples_per_row": "pack.max_samples_per_row",
             "sft_template": "pack.sft_template", "image_root": "pack.image_root", "packing": "pack.packing",
             "window": "pack.window", "workers": "pack.workers", "text_key": "pack.text_key",
             "truncate": "pack.truncate", "max_samples_in_memory": "pack.max_samples_in_memory",
             "image_strategy": "data.image_strategy", "alpha": "data.alpha", "pre_squash": "data.pre_squash",
             "pad_as_target": "data.pad_as_target", "original_image_offset": "data.original_image_offset"}


def main(argv=None) -> int:
    from oq2vl_jax import cli

    p = cli.parser("python -m oq2vl_jax.data.pack", __doc__.split("\n\n")[0])
    cli.add_config(p, required=False, help="the run's YAML config: seq_len, image_tokens, image size, max_images, "
                                           "tokenizer and the pack section are read from it (flags override)")
    p.add_argument("--input", nargs="+", required=True,
                   help="shards/files; brace patterns ({00000..00099}, {a,b}) and globs (quote them)")
    cli.add_tokenizer(p)
    cli.add_out(p)
    g = p.add_argument_group("overrides of config keys (default: the config's, else the packer's default)")
    g.add_argument("--mode", choices=MODES, help="caption: WebDataset tars; sft: LLaVA json/jsonl; "
                                                 "text: jsonl/json/txt documents; interleaved: OBELICS-style "
                                                 "documents (tars of {key}.json, or jsonl) (pack.mode)")
    g.add_argument("--seq-len", type=int, help="row length (data.seq_len; default 4096)")
    g.add_argument("--image-tokens", type=int, help="image slots per image (model.image_tokens; default 144)")
    g.add_argument("--image-size", type=int, help="stored images are size x size (model.vision.image_size)")
    g.add_argument("--image-format", choices=("jpeg", "png"))
    g.add_argument("--jpeg-quality", type=int)
    g.add_argument("--max-images", type=int, help="per-row image cap (data.max_images; default: "
                                                  "seq_len // (image_tokens + 3))")
    g.add_argument("--max-samples-per-row", type=int,
                   help="per-row sample cap; keep it <= model.max_segments with attention: cudnn")
    g.add_argument("--sft-template", choices=("chatml", "original", "plain"))
    g.add_argument("--image-root", help="SFT: base folder for relative image paths")
    g.add_argument("--packing", choices=("ffd", "none"), help="none: one sample per row (unpacked SFT batches)")
    g.add_argument("--window", type=int, help="input shards packed together (default 1)")
    g.add_argument("--workers", type=int)
    g.add_argument("--text-key", help="text mode: json/jsonl field holding the document")
    p.add_argument("--allow-missing", action="store_true",
                   help="pack the shards a brace pattern names that exist, even if some are missing")
    g.add_argument("--truncate", action="store_const", const=True,
                   help="cut samples longer than seq_len (as the original) instead of skipping them")
    g.add_argument("--max-samples-in-memory", type=int,
                   help="FFD packs at most this many samples at a time: bounds memory for one huge input file "
                        "(pack.max_samples_in_memory; default 50000)")
    f = p.add_argument_group("fidelity switches (data.* keys; defaults: corrected behaviour; README 'Fidelity')")
    f.add_argument("--image-strategy", choices=transforms.STRATEGIES,
                   help="squash (the original's resize-naive; default), letterbox (mean-colour padding), resize-crop")
    f.add_argument("--alpha", choices=transforms.ALPHA,
                   help="white: composite transparency on white (default); drop: PIL convert('RGB') as the original")
    f.add_argument("--pre-squash", choices=transforms.PRE_SQUASH,
                   help="lanczos: the original pickle packer's LANCZOS resize of images over image-size")
    f.add_argument("--pad-as-target", action="store_const", const=True,
                   help="fill each row's slack with <|pad|> tokens trained on, as the original pickle path")
    f.add_argument("--original-image-offset", action="store_const", const=True,
                   help="SFT: drop the token after <image> in a turn starting with <s> (tokenizer_image_token)")
    g.add_argument("--min-pixels", type=int, help="qwen2vl modes: resize lower bound, an area "
                                                  "(model.qwen2_vl_vision.min_pixels; default 56*56)")
    g.add_argument("--max-pixels", type=int, help="qwen2vl modes: resize upper bound "
                                                  "(model.qwen2_vl_vision.max_pixels; default 28*28*1280)")
    g.add_argument("--max-patches", type=int, help="qwen2vl modes: patches per row (data.max_patches; "
                                                   "default 4 * seq_len)")
    a = p.parse_args(argv)

    def body():
        from oq2vl_jax import resolve

        values = {key: getattr(a, flag) for flag, key in FLAG_KEYS.items() if getattr(a, flag) is not None}
        if a.tokenizer:
            values["tokenizer"] = a.tokenizer
        cfg = cli.load_config(a, values)
        inputs = readers.resolve_inputs(a.input, a.allow_missing)
        settings = resolve.for_pack(cfg, a.out)
        run(settings, inputs, window=cfg.pack.window, workers=cfg.pack.workers,
            log=lambda m: print(m, file=sys.stderr, flush=True))

    return cli.run(body, a)


if __name__ == "__main__":
    sys.exit(main())
