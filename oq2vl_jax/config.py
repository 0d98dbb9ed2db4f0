"""The run config: model, data, optimiser, training loop and mesh, loaded from YAML.

`load_config("configs/pretrain.yaml", ["optim.lr=3e-5"])` returns a frozen, validated `Config`;
unknown keys and bad values raise ConfigError naming them (see configlib).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from oq2vl_jax.configlib import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from oq2vl_jax.models.config import ModelConfig

__all__ = ["Config", "ConfigError", "DataConfig", "MeshConfig", "OptimConfig", "SourceConfig",
           "TrainConfig", "PackSettings", "load_config", "config_from_dict", "to_dict"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Packed ArrayRecord shards (a directory written by `oq2vl_jax.data.pack`, or a glob)."""

    path: str
    weight: float = 1.0

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"source {self.path!r}: weight must be > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = ()
    eval_source: str | None = None  # held-out packed shards for validation loss
    global_batch_size: int = 256  # rows per optimiser step, over all processes and micro-batches
    # None: from the packed data's stats.json (for pack: 4096 and seq_len // (image_tokens + 3)).
    seq_len: int | None = None
    max_images: int | None = None  # image slots per row (the most any packed row holds)
    num_workers: int = 0  # Grain worker processes per host (0 = in-process)
    seed: int = 7
    mode: Literal["packed", "unpacked_sft"] = "packed"
    # "uint8": workers hand over raw pixels and the model normalises them on the device (4x less to
    # copy between processes and to the GPU); "float32": normalised to [-1, 1] in the workers.
    image_dtype: Literal["float32", "uint8"] = "float32"
    # unpacked_sft batch order: "shuffle" (uniform) or "modality_length" (the original's
    # SplitModalitySampler: each global batch one modality, rows grouped by length per data shard).
    sampler: Literal["shuffle", "modality_length"] = "shuffle"
    # Pack-time fidelity switches (the same as pack's flags; README "Fidelity"). Defaults are the
    # corrected behaviour; the other values reproduce the original.
    image_strategy: Literal["squash", "letterbox", "resize-crop"] = "squash"
    alpha: Literal["white", "drop"] = "white"
    pre_squash: Literal["none", "lanczos"] = "none"
    pad_as_target: bool = False
    original_image_offset: bool = False
    # model.arch qwen2_vl: patches per row's patch row (0 = 4 * seq_len, room for any row; pack with
    # --max-patches to use less).
    max_patches: int = 0

    def __post_init__(self):
        if (self.global_batch_size < 1 or (self.seq_len is not None and self.seq_len < 2)
                or (self.max_images is not None and self.max_images < 0)):
            raise ValueError("global_batch_size >= 1, seq_len >= 2 and max_images >= 0 are required")
        if self.sampler == "modality_length" and self.mode != "unpacked_sft":
            raise ValueError("sampler: modality_length orders unpacked SFT rows; it needs mode: unpacked_sft")
        if self.max_patches < 0 or self.max_patches % 4:
            raise ValueError(f"data.max_patches={self.max_patches} must be a multiple of 4 (0 = 4 * seq_len)")


@dataclasses.dataclass(frozen=True)
class PackSettings:
    """How `python -m oq2vl_jax.data.pack` builds rows; seq_len, image_tokens, image size, max_images
    and the tokenizer come from the data/model sections and `tokenizer`, as training reads them."""

    mode: Literal["caption", "sft", "text", "interleaved", "qwen2vl_caption", "qwen2vl_sft"] = "caption"
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = 95
    max_samples_per_row: int | None = None  # bounds segments for the cuDNN packed layout
    sft_template: Literal["chatml", "original", "plain"] = "chatml"  # plain: the eval's raw prompts
    image_root: str | None = None  # SFT: base folder of relative image paths (default: the json's)
    packing: Literal["ffd", "none"] = "ffd"  # none: one sample per row (unpacked SFT batches)
    text_key: str = "text"  # text mode: the json/jsonl field holding the document
    truncate: bool = False  # cut over-long samples to the row (as the original) instead of skipping
    window: int = 1  # input shards packed together
    workers: int = 1
    # FFD packs at most this many samples at a time: bounds memory for one huge input file (a
    # 10M-conversation SFT json); a shard under it is packed whole, as the original.
    max_samples_in_memory: int = 50_000

    def __post_init__(self):
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        low = [f"{n} >= 1" for n in ("window", "workers", "max_samples_in_memory") if getattr(self, n) < 1]
        if self.max_samples_per_row is not None and self.max_samples_per_row < 1:
            low.append("max_samples_per_row >= 1")
        if low:
            raise ValueError(f"need {', '.join(low)}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    warmup_ratio: float = 0.03
    final_lr_ratio: float = 0.0  # cosine decays to lr * final_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    # "masked": no decay on norms and biases (the configured intent). "none": no decay at all, which
    # is what the original effectively ran (FSDP flattened every parameter to 1-D; spec section 6).
    weight_decay_mode: Literal["masked", "none"] = "masked"
    clip_grad_norm: float = 1.0
    # Continue a schedule instead of re-warming (second paper): the schedule starts at this step of a
    # warmup+cosine curve of `schedule_steps` total steps (0 = this run's own length).
    schedule_offset: int = 0
    schedule_steps: int = 0
    # Parameter-path regexes (matched against "a.b.0.c") that get no gradient and no optimiser state.
    freeze: tuple[str, ...] = (r"^vision_tower\.",)
    # (regex, multiplier) pairs scaling the learning rate of matching parameters.
    lr_multipliers: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        checks = {"lr >= 0": self.lr >= 0, "0 <= warmup_ratio <= 1": 0 <= self.warmup_ratio <= 1,
                  "0 <= final_lr_ratio <= 1": 0 <= self.final_lr_ratio <= 1, "0 <= b1 < 1": 0 <= self.b1 < 1,
                  "0 <= b2 < 1": 0 <= self.b2 < 1, "eps > 0": self.eps > 0, "weight_decay >= 0": self.weight_decay >= 0,
                  "clip_grad_norm >= 0 (0 = off)": self.clip_grad_norm >= 0,
                  "schedule_offset >= 0": self.schedule_offset >= 0, "schedule_steps >= 0": self.schedule_steps >= 0,
                  "lr_multipliers >= 0": all(m >= 0 for _, m in self.lr_multipliers)}
        failed = [name for name, ok in checks.items() if not ok]  # NaN fails every comparison too
        if failed:
            raise ValueError(f"need {', '.join(failed)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    # > 0: train this many passes over the one data source instead, steps = ceil(epochs x rows /
    # global_batch_size) from the packer's stats.json (the original's epoch rule, spec section 6);
    # the computed steps are written into the run's config.yaml.
    epochs: float = 0.0
    micro_batches: int = 1  # gradient accumulation: micro-batches per optimiser step
    # "tokens": mean over all target tokens of the step (every token weighs the same).
    # "micro_batch_mean": the original's weighting (spec section 4): each GPU took the token mean of
    # its own micro-batch of `loss_group_rows` rows, gradients were averaged over GPUs and divided by
    # the accumulation steps; here: the mean over groups of `loss_group_rows` consecutive rows of each
    # group's token mean, divided by micro_batches (independent of our own mesh).
    loss_reduction: Literal["tokens", "micro_batch_mean"] = "tokens"
    loss_group_rows: int = 2  # the original's per-GPU batch (2 in its pre-training and SFT)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = never
    eval_batches: int = 8
    checkpoint_every: int = 500
    keep_last: int = 3
    keep_every: int = 0  # additionally keep every N-th step's checkpoint (0 = none)
    async_checkpointing: bool = True
    init_from: str | None = None  # a converted checkpoint directory (tools/convert/hf_to_jax.py)
    # Per-device bf16 dense peak for MFU. None: from the device kind (H100/H200/A100/B200); MFU is
    # n/a on other devices (e.g. CPU) unless this is set.
    peak_tflops: float | None = None
    # (first, last): trace these steps with jax.profiler into WORKDIR/profile (TensorBoard / Perfetto)
    profile_steps: tuple[int, int] | None = None

    def __post_init__(self):
        at_least_1 = ("steps", "micro_batches", "loss_group_rows", "log_every", "checkpoint_every", "eval_batches")
        low = [f"{n} >= 1" for n in at_least_1 if not getattr(self, n) >= 1]
        low += [f"{n} >= 0" for n in ("epochs", "eval_every", "keep_last", "keep_every") if not getattr(self, n) >= 0]
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            low.append("peak_tflops > 0")
        if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            low.append("1 <= profile_steps[0] <= profile_steps[1]")
        if low:
            raise ValueError(f"need {', '.join(low)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1

    def __post_init__(self):
        bad = [f"{n}={getattr(self, n)}" for n in ("data", "fsdp", "tensor") if getattr(self, n) < 1 and getattr(self, n) != -1]
        if bad:
            raise ValueError(f"mesh sizes must be >= 1 or -1 (all remaining devices), got {', '.join(bad)}")

@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    pack: PackSettings = PackSettings()
    tokenizer: str | None = None  # HF tokenizer directory


def config_from_dict(data: dict) -> Config:
    return from_dict(Config, data)


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path)
    try:
        return config_from_dict(apply_overrides(data, list(overrides or [])))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
