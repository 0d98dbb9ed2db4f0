"""oq2vl_jax: JAX/Flax NNX reimplementation of the Open-Qwen2VL training system."""

__version__ = "0.1.0"
