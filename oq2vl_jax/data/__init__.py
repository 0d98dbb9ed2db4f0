"""Data pipeline: tokenizer prep, sample building, FFD packing to ArrayRecord, Grain loaders.

CLIs: ``python -m oq2vl_jax.data.demo`` (bundled shapes dataset) and ``python -m oq2vl_jax.data.pack``.
Modules import lazily-heavy dependencies (transformers, grain) inside functions, so importing this
package stays cheap.
"""
