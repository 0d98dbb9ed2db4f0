"""PooledLlava: Llava (SigLIP + 2-layer MLP projector + LM) with Open-Qwen2VL's pooling step.

The selected vision hidden states [N, g*g, C] are pooled with torch's adaptive_avg_pool2d to
side x side (side = isqrt(image_seq_length); 27x27 -> 12x12 for 144 tokens) and only then projected:
pool -> linear_1 -> act -> linear_2. Weights use the stock Llava layout (the pool has none).
Load with AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True).
"""

import math

import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from .configuration_pooled_llava import PooledLlavaConfig

try:
    # transformers v5 applies its Llava key renames (legacy on-disk names -> module names) only to
    # registered model types; v4 inherits them through LlavaForConditionalGeneration instead.
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    register_checkpoint_conversion_mapping("pooled_llava", get_checkpoint_conversion_mapping("llava"),
                                           overwrite=True)
except ImportError:
    pass


class PooledLlavaMultiModalProjector(LlavaMultiModalProjector):
    def __init__(self, config):
        super().__init__(config)
        self.side = math.isqrt(config.image_seq_length)

    def forward(self, image_features):
        n, t, c = image_features.shape
        grid = math.isqrt(t)
        x = image_features.transpose(1, 2).reshape(n, c, grid, grid)  # row-major patches
        x = F.adaptive_avg_pool2d(x, (self.side, self.side))
        return super().forward(x.flatten(2).transpose(1, 2))


class PooledLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = PooledLlavaConfig

    def __init__(self, config):
        super().__init__(config)
        # Same parameters as the stock projector, so loading and tying are unchanged.
        self.model.multi_modal_projector = PooledLlavaMultiModalProjector(config)
