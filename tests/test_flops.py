"""The MFU formula's parameter counts agree with the HF models (meta device: nothing allocated)."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from oq2vl_jax.flops import llm_matmul_params, peak_flops_per_device, train_step_flops, vision_forward_flops_per_image
from oq2vl_jax.models import ModelConfig, TextConfig

# The full-size model: Qwen2.5-1.5B (its 151,936-row embedding) + so400m, pooled to 144 tokens.
FULL = ModelConfig(text=TextConfig(vocab_size=151936), image_tokens=144, image_token_id=151655)


def _matmul_params(module, skip=("norm", "bias")):
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


def test_llm_matmul_params_are_hf_weights_without_norms_and_biases():
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                          num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                          tie_word_embeddings=True))
    assert llm_matmul_params(FULL) == _matmul_params(hf) == 1_543_569_408


def test_vision_flops_count_the_layers_that_run():
    with torch.device("meta"):
        hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                  num_attention_heads=16, image_size=384, patch_size=14,
                                                  vision_use_head=False))
    per_layer = _matmul_params(hf.encoder.layers[0])
    patch = hf.embeddings.patch_embedding.weight.numel()
    p, d, layers = 729, 1152, 26  # second-to-last block: 26 of 27 layers run
    expected = 2 * p * (layers * per_layer + patch) + 4 * layers * p * p * d
    assert vision_forward_flops_per_image(FULL) == expected


def test_step_flops_scale_with_rows_and_images():
    cfg = FULL
    one = train_step_flops(cfg, 1, 4096, 0)
    assert train_step_flops(cfg, 2, 4096, 0) == 2 * one
    assert train_step_flops(cfg, 1, 4096, 22) > one


def test_peak_flops_come_from_the_device_kind_unless_configured():
    kinds = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989, "NVIDIA GH200 480GB": 989,
             "NVIDIA A100-SXM4-40GB": 312, "NVIDIA A100 80GB PCIe": 312, "NVIDIA B200": 2250}
    for kind, tflops in kinds.items():
        assert peak_flops_per_device(kind, None) == tflops * 1e12, kind
    assert peak_flops_per_device("cpu", None) is None  # MFU is n/a rather than made up
    assert peak_flops_per_device("cpu", 0.5) == peak_flops_per_device("NVIDIA H100 80GB HBM3", 0.5) == 0.5e12


def test_qwen2_vl_vision_flops_use_hf_qwen2_vl_weights():
    """Per patch: the frozen ViT's matmul weights (Conv3d counted once: both frames are one image);
    per merged token: the merger's; plus attention over the patch row."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from oq2vl_jax.flops import qwen2_vl_vision_flops
    from oq2vl_jax.models import Qwen2VLVisionConfig, TextConfig

    with torch.device("meta"):
        hf = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
            text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2), tie_word_embeddings=True)).model.visual
    cfg = ModelConfig(arch="qwen2_vl", qwen2_vl_vision=Qwen2VLVisionConfig(),
                      text=TextConfig(vocab_size=151936, mrope_section=(16, 24, 24)))
    blocks = sum(_matmul_params(b) for b in hf.blocks)
    patch = hf.patch_embed.proj.weight.numel() // 2
    merger = _matmul_params(hf.merger, skip=("ln_q", "bias"))
    patches, row = 4096, 4096
    expected = 2 * (blocks + patch) * patches + 4 * 32 * 1280 * row**2 + 3 * 2 * merger * patches / 4
    assert qwen2_vl_vision_flops(cfg, 1, patches, row, vision_trained=False) == expected
    assert train_step_flops(cfg, 1, 4096, patches, patch_row=row) == (
        train_step_flops(cfg, 1, 4096, 0, patch_row=0) + expected)
