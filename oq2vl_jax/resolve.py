"""Settings derived instead of demanded, and every cross-field and data-dependent check, in one place.

A config may leave unset what the tokenizer or the packed data already say:
- model.image_token_id: the tokenizer's <|image_pad|> (else what the data were packed with);
- model.text.vocab_size: train.init_from's, else the tokenizer's length rounded up to a multiple of
  128 x mesh.tensor (so the vocabulary axis splits over the mesh);
- model.image_tokens, data.seq_len, data.max_images, model.max_segments: the packed sources'
  stats.json (written by oq2vl_jax.data.pack).
A value the user did set is kept, and refused by name only when it contradicts the data.

`for_pack(cfg)` gives the packer its settings from the same config; `for_train(cfg)` gives training
a complete config (written as the run's config.yaml) after all checks.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from oq2vl_jax.config import Config
from oq2vl_jax.configlib import ConfigError

PACK_DEFAULT_SEQ_LEN = 4096
PACK_DEFAULT_IMAGE_TOKENS = 144  # the pre-training pooling (12 x 12)
VOCAB_MULTIPLE = 128


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """cfg with fields of its sections replaced: replace(cfg, data={"seq_len": 128})."""
    new = {}
    for name, fields in sections.items():
        new[name] = dataclasses.replace(getattr(cfg, name), **fields)
    return dataclasses.replace(cfg, **new)


# ----- facts ---------------------------------------------------------------------------------------
def tokenizer_ids(path: str):
    """The special ids and length of a tokenizer directory, or a ConfigError naming what is wrong."""
    from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids

    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer: {path!r} is not a directory")
    names = os.listdir(path)
    if not any(n.startswith(("tokenizer", "vocab")) for n in names):
        raise ConfigError(f"tokenizer: {path!r} holds no tokenizer files (tokenizer.json or vocab.json + "
                          f"merges.txt); found {sorted(names)[:5] or 'nothing'}")
    try:
        return special_ids(load_tokenizer(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: {path!r} does not load: {' '.join(str(e).split())}") from None


def source_stats(paths: list[str]) -> dict[str, dict]:
    """{path: stats.json} for the sources that have one (a glob of foreign shards has none)."""
    from oq2vl_jax.data.loader import pack_stats

    out = {}
    for p in paths:
        try:
            st = pack_stats(p)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        if st is not None:
            out[p] = st
    return out


def _agreed(key: str, values: dict[str, Any]) -> Any:
    """The one value all sources agree on (None if none says), else a ConfigError listing them."""
    distinct = sorted({v for v in values.values() if v is not None}, key=str)
    if len(distinct) > 1:
        listed = ", ".join(f"{p}: {v}" for p, v in values.items())
        raise ConfigError(f"the data sources disagree on {key} ({listed}); pack them alike or train them apart")
    return distinct[0] if distinct else None


def _init_model(cfg: Config) -> dict:
    """The model section of train.init_from's config.yaml (empty when there is none)."""
    src = cfg.train.init_from
    if not src:
        return {}
    from oq2vl_jax.configlib import load_yaml

    path = os.path.join(src, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"train.init_from: {src!r} is not a checkpoint directory (no config.yaml)")
    return load_yaml(path).get("model") or {}


def round_vocab(n: int, tensor: int) -> int:
    m = VOCAB_MULTIPLE * max(tensor, 1)
    return -(-n // m) * m


# ----- pack ----------------------------------------------------------------------------------------
def for_pack(cfg: Config, out: str):
    """The packer's settings (data.pack.PackConfig) from the one config."""
    from oq2vl_jax.data.pack import PackConfig

    if not cfg.tokenizer:
        raise ConfigError("tokenizer is unset: give the HF tokenizer directory (tokenizer: DIR or --tokenizer)")
    ids = tokenizer_ids(cfg.tokenizer)
    if cfg.model.image_token_id is not None and cfg.model.image_token_id != ids.image:
        raise ConfigError(f"model.image_token_id={cfg.model.image_token_id} but the tokenizer {cfg.tokenizer!r} "
                          f"has <|image_pad|> = {ids.image}; leave it unset to take the tokenizer's")
    p = cfg.pack
    seq_len = cfg.data.seq_len or PACK_DEFAULT_SEQ_LEN
    image_tokens = cfg.model.image_tokens or PACK_DEFAULT_IMAGE_TOKENS
    qwen2vl = p.mode.startswith("qwen2vl")
    if qwen2vl:  # each image's own token count, from its size
        v = cfg.model.qwen2_vl_vision
        try:
            return PackConfig(
                tokenizer=cfg.tokenizer, out=out, mode=p.mode, seq_len=seq_len, image_format=p.image_format,
                jpeg_quality=p.jpeg_quality, max_images=cfg.data.max_images, max_samples=p.max_samples_per_row,
                image_root=p.image_root, packing=p.packing, min_pixels=v.min_pixels, max_pixels=v.max_pixels,
                max_patches=cfg.data.max_patches or None)
        except ValueError as e:
            raise ConfigError(f"pack: {e}") from None
    if p.mode != "text" and image_tokens + 3 > seq_len:
        raise ConfigError(f"data.seq_len={seq_len} cannot hold one image of model.image_tokens={image_tokens} "
                          f"(+ <s>, a text token and <|im_end|>): set data.seq_len >= {image_tokens + 3}")
    try:
        return PackConfig(
            tokenizer=cfg.tokenizer, out=out, mode=p.mode, seq_len=seq_len, image_tokens=image_tokens,
            image_size=cfg.model.vision.image_size,
            image_format=p.image_format, jpeg_quality=p.jpeg_quality, max_images=cfg.data.max_images,
            max_samples=p.max_samples_per_row, sft_template=p.sft_template, image_root=p.image_root,
            packing=p.packing, text_key=p.text_key, truncate=p.truncate,
            max_samples_in_memory=p.max_samples_in_memory, image_strategy=cfg.data.image_strategy,
            alpha=cfg.data.alpha, pre_squash=cfg.data.pre_squash, pad_as_target=cfg.data.pad_as_target,
            original_image_offset=cfg.data.original_image_offset)
    except ValueError as e:
        raise ConfigError(f"pack: {e}") from None


# ----- train ---------------------------------------------------------------------------------------
def mesh_devices(cfg: Config, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes the mesh will have on n_devices (-1 = all remaining)."""
    shape = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if shape.count(-1) > 1:
        raise ConfigError("mesh: at most one of data, fsdp, tensor may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(f"mesh {cfg.mesh}: {n_devices} devices do not divide by {known}")
        shape[shape.index(-1)] = n_devices // known
    return tuple(shape)


def for_train(cfg: Config, process_count: int = 1, n_devices: int = 1) -> Config:
    """The complete run config: derived keys filled in, every check passed (else ConfigError)."""
    d, t = cfg.data, cfg.train
    if not d.sources:
        raise ConfigError("data.sources is empty: nothing to train on")
    if t.eval_every and not d.eval_source:
        raise ConfigError(f"train.eval_every={t.eval_every} needs data.eval_source (or eval_every: 0)")
    paths = [s.path for s in d.sources] + ([d.eval_source] if d.eval_source else [])
    stats = source_stats(paths)
    cfg = _derive_model(cfg, stats)
    cfg = _derive_data(cfg, stats)
    _check_sources(cfg, stats)
    cfg = steps_from_epochs(cfg, stats)
    _check_schedule(cfg)
    _check_batch(cfg, process_count, n_devices)
    return cfg


def _derive_model(cfg: Config, stats: dict[str, dict]) -> Config:
    m = cfg.model
    imaged = {p: s for p, s in stats.items() if s.get("mode") != "text"}
    init = _init_model(cfg)
    ids = tokenizer_ids(cfg.tokenizer) if cfg.tokenizer else None
    packed_ids = {p: (s.get("tokenizer") or {}).get("image_token_id") for p, s in stats.items()}

    image_token_id = m.image_token_id
    if ids is not None and image_token_id is not None and image_token_id != ids.image:
        raise ConfigError(f"model.image_token_id={image_token_id} but the tokenizer {cfg.tokenizer!r} has "
                          f"<|image_pad|> = {ids.image}; leave it unset to take the tokenizer's")
    from_data = _agreed("the image token id", packed_ids)
    if image_token_id is None:
        image_token_id = ids.image if ids is not None else (from_data if from_data is not None else init.get("image_token_id"))
    if image_token_id is None:
        raise ConfigError("model.image_token_id is unset and there is no tokenizer, packed stats.json or "
                          "init_from config to take it from: set `tokenizer`")
    if from_data is not None and from_data != image_token_id:
        raise ConfigError(f"the data were packed with image token id {from_data}, the model uses "
                          f"{image_token_id}: repack with this tokenizer")

    image_tokens = m.image_tokens
    packed_tokens = _agreed("image_tokens", {p: s.get("image_tokens") for p, s in imaged.items()})
    if m.arch == "qwen2_vl":  # every image has its own token count; the markers are the tokenizer's
        _check_qwen2_vl_tokens(cfg)
    elif image_tokens is None:
        image_tokens = packed_tokens or init.get("image_tokens") or PACK_DEFAULT_IMAGE_TOKENS
    elif packed_tokens is not None and packed_tokens != image_tokens:
        path = next(p for p, s in imaged.items() if s.get("image_tokens") != image_tokens)
        raise ConfigError(f"{path}: packed with {packed_tokens} placeholder tokens per image, the model takes "
                          f"model.image_tokens={image_tokens}; repack with model.image_tokens={image_tokens}, or leave it unset")

    vocab = m.text.vocab_size
    lens = [(s.get("tokenizer") or {}).get("vocab_len") or 0 for s in stats.values()]
    need = max(lens + ([ids.vocab_len] if ids else []), default=0)
    if vocab is None:
        vocab = (init.get("text") or {}).get("vocab_size") or (round_vocab(need, cfg.mesh.tensor) if need else None)
    if vocab is None:
        raise ConfigError("model.text.vocab_size is unset and there is no tokenizer, packed stats.json or "
                          "init_from config to take it from: set `tokenizer`")
    if vocab < need:
        raise ConfigError(f"model.text.vocab_size={vocab} < tokenizer size {need}")

    max_segments = m.max_segments
    most = max((s.get("max_samples_in_row", 0) for s in stats.values()), default=0)
    if max_segments is None:
        max_segments = most or None
    elif m.attention == "cudnn" and most > max_segments:
        path = next(p for p, s in stats.items() if s.get("max_samples_in_row", 0) == most)
        raise ConfigError(f"{path} has rows of up to {most} samples > model.max_segments={max_segments}; "
                          "raise it (or leave it unset) or repack with pack.max_samples_per_row")
    try:
        return replace(cfg, model=dict(image_token_id=image_token_id, image_tokens=image_tokens,
                                       max_segments=max_segments, text=dataclasses.replace(m.text, vocab_size=vocab)))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def _check_qwen2_vl_tokens(cfg: Config) -> None:
    if not cfg.tokenizer:
        return
    from oq2vl_jax.data.qwen2_vl_text import load_qwen2_vl_tokenizer, qwen2_vl_ids

    try:
        ids = qwen2_vl_ids(load_qwen2_vl_tokenizer(cfg.tokenizer))
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: {cfg.tokenizer!r}: {e}") from None
    m = cfg.model
    for name, theirs in (("vision_start_token_id", ids.vision_start), ("vision_end_token_id", ids.vision_end)):
        if getattr(m, name) != theirs:
            raise ConfigError(f"model.{name}={getattr(m, name)} but the tokenizer {cfg.tokenizer!r} has {theirs}")


def _derive_data(cfg: Config, stats: dict[str, dict]) -> Config:
    d = cfg.data
    seq_len = d.seq_len
    packed_len = _agreed("seq_len", {p: s.get("seq_len") for p, s in stats.items()})
    if seq_len is None:
        seq_len = packed_len
    if seq_len is None:
        raise ConfigError("data.seq_len is unset and no source has a stats.json to take it from")
    most_images = max((s.get("max_images_in_row", s.get("max_images", 0)) for s in stats.values()), default=None)
    max_images = d.max_images
    if max_images is None:
        max_images = most_images
    if max_images is None:
        raise ConfigError("data.max_images is unset and no source has a stats.json to take it from")
    return replace(cfg, data=dict(seq_len=seq_len, max_images=max_images))


def check_source(stats: dict, path: str, *, seq_len: int, image_size: int, max_images: int,
                 image_tokens: int | None, unpacked: bool) -> None:
    """A packed source agrees with how it is read (also the loader's own guard); ValueError otherwise."""
    if image_tokens is not None and stats["mode"] != "text" and stats["image_tokens"] != image_tokens:
        raise ValueError(f"{path}: packed with {stats['image_tokens']} placeholder tokens per image, the model "
                         f"takes image_tokens={image_tokens}; repack with model.image_tokens={image_tokens}")
    if stats["seq_len"] != seq_len:
        raise ValueError(f"{path}: packed with seq_len={stats['seq_len']}, data.seq_len={seq_len}")
    if stats["mode"] != "text" and stats["image_size"] != image_size:
        raise ValueError(f"{path}: images stored at {stats['image_size']}px, model.vision.image_size={image_size}")
    most = stats.get("max_images_in_row", stats["max_images"])  # what the rows hold, not the packer's cap
    if most > max_images:
        raise ValueError(f"{path}: has rows of {most} images (pack cap {stats['max_images']}), data.max_images="
                         f"{max_images}; raise data.max_images (or leave it unset) or repack with a lower cap")
    if unpacked and stats.get("packing") != "none":
        raise ValueError(f"{path}: data.mode='unpacked_sft' needs rows packed with pack.packing=none")


def check_qwen2_vl_source(stats: dict, path: str, *, seq_len: int, max_images: int, max_patches: int, vision,
                          unpacked: bool) -> None:
    """check_source for model.arch qwen2_vl (vision: its Qwen2VLVisionConfig; None: an oq2vl model)."""
    if vision is None:
        raise ValueError(f"{path}: packed for Qwen2-VL (pack.mode {stats['mode']}); this model is arch oq2vl")
    if stats["mode"] not in ("text", "qwen2vl_caption", "qwen2vl_sft"):
        raise ValueError(f"{path}: packed with pack.mode {stats['mode']}; model.arch qwen2_vl reads qwen2vl_caption/"
                         "qwen2vl_sft (or text) data")
    if stats["seq_len"] != seq_len:
        raise ValueError(f"{path}: packed with seq_len={stats['seq_len']}, data.seq_len={seq_len}")
    if stats["mode"] != "text":
        if (stats["min_pixels"], stats["max_pixels"]) != (vision.min_pixels, vision.max_pixels):
            raise ValueError(f"{path}: images resized for min/max pixels {stats['min_pixels']}/{stats['max_pixels']}, "
                             f"model.qwen2_vl_vision says {vision.min_pixels}/{vision.max_pixels}")
        if stats["max_patches"] > max_patches:
            raise ValueError(f"{path}: rows of up to {stats['max_patches']} patches (pack max_patches), "
                             f"data.max_patches={max_patches}; raise it or repack")
    if stats.get("max_images_in_row", 0) > max_images:
        raise ValueError(f"{path}: has rows of {stats['max_images_in_row']} images, data.max_images={max_images}; "
                         "raise data.max_images (or leave it unset)")
    if unpacked and stats.get("packing") != "none":
        raise ValueError(f"{path}: data.mode='unpacked_sft' needs rows packed with pack.packing=none")


def _check_sources(cfg: Config, stats: dict[str, dict]) -> None:
    from oq2vl_jax.data.loader import PACK_SWITCHES, check_pack_switches

    m = cfg.model
    for path, st in stats.items():
        try:
            if m.arch == "qwen2_vl" or st["mode"].startswith("qwen2vl"):
                check_qwen2_vl_source(st, path, seq_len=cfg.data.seq_len, max_images=cfg.data.max_images,
                                      max_patches=cfg.data.max_patches or 4 * cfg.data.seq_len,
                                      vision=m.qwen2_vl_vision if m.arch == "qwen2_vl" else None,
                                      unpacked=cfg.data.mode == "unpacked_sft")
                continue
            check_source(st, path, seq_len=cfg.data.seq_len, image_size=cfg.model.vision.image_size,
                         max_images=cfg.data.max_images, image_tokens=cfg.model.image_tokens,
                         unpacked=cfg.data.mode == "unpacked_sft")
            check_pack_switches([path], {k: getattr(cfg.data, k) for k in PACK_SWITCHES})
        except ValueError as e:
            raise ConfigError(str(e)) from None


def steps_from_epochs(cfg: Config, stats: dict[str, dict] | None = None) -> Config:
    """With train.epochs > 0, train.steps from the one source's row count (the original's epoch rule)."""
    if not cfg.train.epochs:
        return cfg
    if stats is None:
        stats = source_stats([s.path for s in cfg.data.sources])
    if len(cfg.data.sources) != 1:
        raise ConfigError(f"train.epochs needs exactly one data source (got {len(cfg.data.sources)}); "
                          "with mixed sources set train.steps")
    path = cfg.data.sources[0].path
    rows = (stats.get(path) or {}).get("rows")
    if not rows:
        raise ConfigError(f"train.epochs: no row count in {path}/stats.json (written by oq2vl_jax.data.pack); "
                          "set train.steps instead")
    steps = math.ceil(cfg.train.epochs * rows / cfg.data.global_batch_size)
    return replace(cfg, train=dict(steps=max(steps, 1)))


def _check_schedule(cfg: Config) -> None:
    """A continued schedule must lie inside the curve it continues: past its end the learning rate is
    lr x final_lr_ratio (0 by default) for every remaining step."""
    o, steps = cfg.optim, cfg.train.steps
    if o.schedule_offset and not o.schedule_steps:
        raise ConfigError(f"optim.schedule_offset={o.schedule_offset} needs optim.schedule_steps, the length "
                          "of the warmup+cosine curve it continues")
    if o.schedule_steps and o.schedule_offset + steps > o.schedule_steps:
        raise ConfigError(f"optim.schedule_offset={o.schedule_offset} + train.steps={steps} runs past "
                          f"optim.schedule_steps={o.schedule_steps}: the steps after it would train at "
                          f"lr x final_lr_ratio = {o.lr * o.final_lr_ratio:g}")


def _check_batch(cfg: Config, process_count: int, n_devices: int) -> None:
    """Rows split evenly over processes, micro-batches, the mesh's batch shards and loss groups."""
    d, t = cfg.data, cfg.train
    if d.global_batch_size % (t.micro_batches * process_count):
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not divisible by "
                          f"train.micro_batches x processes = {t.micro_batches} x {process_count}")
    data, fsdp, _ = mesh_devices(cfg, n_devices)
    shards = data * fsdp
    rows_per_micro = d.global_batch_size // t.micro_batches
    if rows_per_micro % shards:
        fits = [m for m in range(t.micro_batches, 0, -1)
                if d.global_batch_size % (m * process_count) == 0 and (d.global_batch_size // m) % shards == 0]
        hint = f"; e.g. train.micro_batches={fits[0]}" if fits else ""
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} / train.micro_batches={t.micro_batches} "
                          f"= {rows_per_micro} rows per micro-batch do not split over mesh data x fsdp = "
                          f"{shards} devices{hint}")
    if t.loss_reduction == "micro_batch_mean" and rows_per_micro % t.loss_group_rows:
        raise ConfigError(f"train.loss_group_rows={t.loss_group_rows} does not divide the {rows_per_micro} "
                          "rows per micro-batch")
