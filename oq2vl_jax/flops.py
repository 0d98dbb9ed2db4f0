"""Model FLOPs of one training step, for MFU. The formula (what bench/ and the logs report):

  LLM      6 * N_llm * tokens          N_llm = matmul parameters of the decoder incl. the LM head
                                       (the input embedding lookup is not a matmul)
         + 3 * 2 * 2 * layers * heads * head_dim * T^2 / 2 per row
                                       causal attention (QK^T and PV), counted once over the whole
                                       row of length T, forward + backward = 3x forward
  vision   2 * N_vit * patches per image + 2 * 2 * layers * P^2 * hidden per image
                                       forward only when the tower is frozen (x3 if trained), only
                                       the layers that are run
  projector 2 * N_proj * patches or pooled tokens, x3 (it trains)

Counting attention over the whole row (not per packed sample) makes figures comparable with a
baseline that runs plain causal attention over the row. MFU divides by the devices' peak:
`train.peak_tflops` when set, else the bf16 dense tensor-core peak of the device kind (below).

Qwen2-VL (model.arch qwen2_vl): `images` counts real patches instead, and the tower costs
  vision   2 * N_vit_per_patch * patches + 2 * 2 * depth * P^2 * embed_dim per patch row of P
           (x3 if trained; attention over the whole patch row, as for the LLM)
  merger   2 * N_merger * patches / 4, x3 (trained)
"""

from __future__ import annotations

from oq2vl_jax.models.config import ModelConfig


# bf16 dense (no sparsity) tensor-core peaks in TFLOP/s per device, from NVIDIA's datasheets, found by
# substring in jax's device_kind (e.g. "NVIDIA H100 80GB HBM3"); the first match wins, so the PCIe
# H100 (fewer SMs, lower clocks) comes before the SXM figure. H200 and GH200 share the H100 SXM's
# compute; they differ in memory.
PEAK_BF16_TFLOPS = (("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0), ("b200", 2250.0))


def peak_flops_per_device(device_kind: str, configured_tflops: float | None = None) -> float | None:
    """FLOP/s an MFU figure divides by: the configured peak, else the device kind's, else None
    (unknown kind, e.g. a CPU: MFU is not reported rather than made up)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    kind = device_kind.lower()
    return next((tflops * 1e12 for name, tflops in PEAK_BF16_TFLOPS if name in kind), None)


def llm_matmul_params(cfg: ModelConfig) -> int:
    t = cfg.text
    hd = t.head_size
    attn = t.hidden_size * hd * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_hidden_layers * (attn + mlp) + t.hidden_size * t.vocab_size


def vision_forward_flops_per_image(cfg: ModelConfig) -> float:
    v = cfg.vision
    layers = v.num_layers_run()
    p = v.num_patches
    per_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    patch = v.num_channels * v.patch_size**2 * v.hidden_size
    return 2.0 * p * (layers * per_layer + patch) + 4.0 * layers * p * p * v.hidden_size


def projector_flops_per_image(cfg: ModelConfig) -> float:
    d_v, d_t = cfg.vision.hidden_size, cfg.text.hidden_size
    return 2.0 * cfg.image_tokens * (d_v * d_t + d_t * d_t)


def train_step_flops(cfg: ModelConfig, rows: int, seq_len: int, images: int, vision_trained: bool = False,
                     patch_row: int = 0) -> float:
    """images: images in the step (qwen2_vl: real patches; patch_row: patches per patch row)."""
    t = cfg.text
    llm = 6.0 * llm_matmul_params(cfg) * rows * seq_len
    attn = 3.0 * 2.0 * t.num_hidden_layers * t.num_attention_heads * t.head_size * seq_len**2 * rows
    if cfg.arch == "qwen2_vl":
        return llm + attn + qwen2_vl_vision_flops(cfg, rows, images, patch_row, vision_trained)
    vision = vision_forward_flops_per_image(cfg) * images * (3.0 if vision_trained else 1.0)
    proj = 3.0 * projector_flops_per_image(cfg) * images
    return llm + attn + vision + proj


def qwen2_vl_vision_flops(cfg: ModelConfig, rows: int, patches: int, patch_row: int, vision_trained: bool) -> float:
    v = cfg.qwen2_vl_vision
    d, hidden = v.embed_dim, v.embed_dim * v.mlp_ratio
    per_patch = v.depth * (4 * d * d + 2 * d * hidden) + v.patch_dim * d
    attn = 4.0 * v.depth * d * patch_row**2 * rows
    wide = d * v.spatial_merge_size**2
    merger = 2.0 * (wide * wide + wide * v.hidden_size) * patches / v.spatial_merge_size**2
    return (2.0 * per_patch * patches + attn) * (3.0 if vision_trained else 1.0) + 3.0 * merger

