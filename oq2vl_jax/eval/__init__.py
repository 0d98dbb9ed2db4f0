"""Benchmark evaluation with the original's protocols: `python -m oq2vl_jax.eval run|score` (docs/eval.md)."""
