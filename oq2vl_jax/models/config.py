"""Model configs. Field names follow the HF configs (SiglipVisionConfig, Qwen2Config) where they exist."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

ATTENTION_IMPLS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower. Defaults: so400m-patch14-384 as Open-Qwen2VL runs it."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    # timm weights (what Open-Qwen2VL ran) use exact erf GELU; HF SiglipVisionModel uses tanh.
    hidden_act: Literal["gelu", "gelu_pytorch_tanh"] = "gelu"
    # Index into HF-style hidden_states (0 = embeddings, i = after layer i): -2 = second-to-last block.
    feature_layer: int = -2
    # Apply post_layernorm to the selected features (valid only for the last layer; the original: no).
    feature_post_layernorm: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision hidden_size must be divisible by num_attention_heads")
        if self.num_layers_run() < 1:
            raise ValueError(f"vision feature_layer={self.feature_layer} selects no encoder layer")
        if self.feature_post_layernorm and self.num_layers_run() != self.num_hidden_layers:
            raise ValueError("feature_post_layernorm needs feature_layer to select the last layer")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size  # VALID conv: trailing pixels are never seen

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def num_layers_run(self) -> int:
        n = self.feature_layer if self.feature_layer >= 0 else self.num_hidden_layers + 1 + self.feature_layer
        return n


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder. Defaults: Qwen2.5-1.5B(-Instruct)."""

    # None: derived at start-up (oq2vl_jax/resolve.py): from train.init_from's config, else the
    # tokenizer's length rounded up to a multiple of 128 x mesh.tensor.
    vocab_size: int | None = None
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as HF Qwen2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    # M-RoPE (Qwen2-VL): rotary frequency pairs per (temporal, height, width) position row, as HF's
    # rope_parameters["mrope_section"]; positions are then [3, B, T]. None: plain 1-D RoPE.
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.mrope_section is not None and (
                len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_size):
            raise ValueError(f"mrope_section={list(self.mrope_section)} must be 3 sizes summing to head_dim/2 "
                             f"({self.head_size // 2})")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """Qwen2-VL vision tower (HF Qwen2VLVisionConfig names) and its image processor's resize bounds.
    Defaults: Qwen2-VL-2B/7B (675M ViT); `hidden_size` is the LLM width the merger projects to."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 1536
    hidden_act: Literal["quick_gelu"] = "quick_gelu"
    mlp_ratio: int = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    # Qwen2VLImageProcessor: each image is resized to multiples of patch_size * spatial_merge_size
    # with min_pixels <= h*w <= max_pixels (HF defaults 56*56 and 28*28*1280).
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def __post_init__(self):
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError("qwen2_vl_vision embed_dim / num_heads must be a multiple of 4 (2-D rotary)")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"qwen2_vl_vision needs 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                             f"{self.max_pixels}")

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (28: a 2x2 block of 14-pixel patches)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def patch_dim(self) -> int:
        """Values per patch as the loader hands them over: one frame (C x p x p); the tower's
        Conv3d sees it twice (temporal_patch_size identical frames, as HF duplicates an image)."""
        return self.in_channels * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # The model family: vision tower, projector and decoder variant (models.ARCHS maps it to a class).
    # "oq2vl": SigLIP -> average-pooled 2-layer GELU MLP -> Qwen2 (Open-Qwen2VL).
    # "qwen2_vl": Qwen2-VL's native-resolution 2-D RoPE ViT -> 2x2 patch merger -> Qwen2 with M-RoPE
    # (uses `qwen2_vl_vision` and text.mrope_section; `vision` and `image_tokens` are unused).
    arch: Literal["oq2vl", "qwen2_vl"] = "oq2vl"
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    qwen2_vl_vision: Qwen2VLVisionConfig = Qwen2VLVisionConfig()
    # Image tokens per image after pooling the patch grid: a square (144 = 12x12 pre-training,
    # 729 = 27x27 identity for SFT). None: from the packed data's stats.json (the packer's default 144).
    image_tokens: int | None = None
    projector_hidden_act: Literal["gelu", "gelu_pytorch_tanh"] = "gelu"
    # Vocabulary id of the placeholder that marks image positions in input_ids (the data path writes
    # `image_tokens` copies per image). None: the tokenizer's <|image_pad|> (or the packed data's).
    image_token_id: int | None = None
    # Qwen2-VL's markers around each image's tokens (HF Qwen2VLConfig names; checked against the
    # tokenizer for arch qwen2_vl).
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Dtype policy: parameters are stored in param_dtype, matmuls run in dtype; norms, softmax and
    # the loss always run in float32.
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    vision_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    attention: Literal["xla", "cudnn"] = "xla"
    # True reproduces the original: plain causal attention over the whole packed row, positions
    # 0..L-1 not reset per sample, and the next sample's first token predicted from the previous one.
    cross_segment_attention: bool = False
    # Static bound on segments per row for the cuDNN packed layout. None: the most samples any row of
    # the packed data holds (stats.json), else 64.
    max_segments: int | None = None
    # Compute the loss this many positions at a time (0 = all at once): bounds the float32 logits
    # ([rows, chunk, vocab] instead of [rows, seq_len, vocab]) at the cost of recomputing them.
    # Chunked by default, so that no config can run out of memory on logits by leaving it out.
    loss_chunk_size: int = 1024
    # Activation checkpointing of decoder layers: none | full | dots (save matmul outputs).
    remat: Literal["none", "full", "dots"] = "full"
    # > 0: run the vision tower on this many image slots per batch shard at a time, real images
    # first, skipping the chunks past the last real image (empty slots cost nothing: text rows in a
    # mix, the unused tail of max_images). 0: every slot, in one batch.
    vision_chunk_size: int = 0

    def __post_init__(self):
        if self.vision_chunk_size < 0 or self.loss_chunk_size < 0:
            raise ValueError("vision_chunk_size and loss_chunk_size must be >= 0")
        if self.max_segments is not None and self.max_segments < 1:
            raise ValueError(f"max_segments={self.max_segments} must be >= 1")
        if self.arch == "qwen2_vl":
            if self.text.mrope_section is None:
                raise ValueError("arch qwen2_vl needs text.mrope_section (Qwen2-VL: [16, 24, 24])")
            if self.qwen2_vl_vision.hidden_size != self.text.hidden_size:
                raise ValueError(f"qwen2_vl_vision.hidden_size={self.qwen2_vl_vision.hidden_size} must equal "
                                 f"text.hidden_size={self.text.hidden_size} (the merger's output width)")
            if self.cross_segment_attention:
                raise ValueError("cross_segment_attention is the original Open-Qwen2VL's quirk; arch qwen2_vl "
                                 "needs each sample's own M-RoPE positions")
            return  # image_tokens is the SigLIP path's; each Qwen2-VL image has its own count
        if self.image_tokens is None:
            return
        side = math.isqrt(self.image_tokens)
        if side * side != self.image_tokens:
            raise ValueError(f"image_tokens={self.image_tokens} is not a square number")
        if side > self.vision.grid_size:
            raise ValueError(
                f"image_tokens={self.image_tokens} ({side}x{side}) exceeds the {self.vision.grid_size}x"
                f"{self.vision.grid_size} patch grid"
            )

    @property
    def pooled_side(self) -> int:
        return math.isqrt(self.image_tokens)

    def unresolved(self) -> list[str]:
        """Keys still None: oq2vl_jax.resolve fills them from the tokenizer and the packed data."""
        names = ("image_token_id",) if self.arch == "qwen2_vl" else ("image_tokens", "image_token_id")
        keys = [f"model.{k}" for k in names if getattr(self, k) is None]
        return keys + (["model.text.vocab_size"] if self.text.vocab_size is None else [])

    def require_resolved(self) -> None:
        missing = self.unresolved()
        if missing:
            from oq2vl_jax.configlib import ConfigError

            raise ConfigError(f"{', '.join(missing)} unset: set them, or give a tokenizer / packed data to "
                              "derive them from (oq2vl_jax.resolve)")

    @property
    def segments(self) -> int:
        """max_segments with its no-data default."""
        return 64 if self.max_segments is None else self.max_segments
