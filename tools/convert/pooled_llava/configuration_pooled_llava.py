"""PooledLlava: Llava whose image features are average-pooled on the patch grid before the projector.

Written by oq2vl_jax's tools/convert/jax_to_hf.py. The only new setting is the model type; the pooled
grid side is isqrt(image_seq_length) (e.g. 144 -> 12x12), so the stock Llava config is enough.
"""

from transformers import LlavaConfig


class PooledLlavaConfig(LlavaConfig):
    model_type = "pooled_llava"
