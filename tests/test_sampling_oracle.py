"""The distribution `sample` draws from equals HF's TemperatureLogitsWarper -> TopPLogitsWarper (after
SuppressTokensLogitsProcessor for ids past the vocabulary limit), and draws with fixed keys follow it."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
from transformers import SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from oq2vl_jax.generate import sample, sampling_logits

V = 48


def _logits(rows: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, V)) * 2.5).astype(np.float32)


def _hf_probs(logits: np.ndarray, temperature: float, top_p: float, vocab_limit: int | None) -> np.ndarray:
    scores, ids = torch.from_numpy(logits.copy()), torch.zeros((logits.shape[0], 1), dtype=torch.long)
    processors = [SuppressTokensLogitsProcessor(list(range(vocab_limit, V)))] if vocab_limit else []
    processors += [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    for proc in processors:
        scores = proc(ids, scores)
    return torch.softmax(scores, dim=-1).numpy()


def _assert_nucleus_unambiguous(logits, temperature, top_p, vocab_limit):
    """No token's preceding mass lies within rounding of top_p: membership is the same in any
    float32 order of summation, so the comparison tests the rule, not the rounding."""
    if top_p >= 1.0:
        return
    x = logits.astype(np.float64)
    if vocab_limit:
        x[:, vocab_limit:] = -np.inf
    p = np.exp(x / temperature - np.max(x / temperature, axis=-1, keepdims=True))
    p = -np.sort(-(p / p.sum(-1, keepdims=True)), axis=-1)
    before = np.cumsum(p, axis=-1) - p
    assert np.abs(before - top_p).min() > 1e-4


@pytest.mark.parametrize("temperature,top_p,vocab_limit", [
    (1.0, 1.0, None), (0.35, 1.0, None), (2.5, 1.0, 40), (1.0, 0.9, None), (0.6, 0.8, None), (1.7, 0.5, 40)])
def test_sampling_distribution_equals_hf_warpers(temperature, top_p, vocab_limit):
    logits = _logits(6, seed=int(temperature * 100 + top_p * 10))
    _assert_nucleus_unambiguous(logits, temperature, top_p, vocab_limit)
    ours = np.asarray(jax.nn.softmax(sampling_logits(logits, temperature=temperature, top_p=top_p,
                                                     vocab_limit=vocab_limit), axis=-1))
    ref = _hf_probs(logits, temperature, top_p, vocab_limit)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5)
    assert np.array_equal(ours > 0, ref > 0)  # the same nucleus exactly


def _chi2_bound(df: int, z: float = 4.75) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 4.75 is a one-sided tail of about 1e-6."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: np.ndarray, probs: np.ndarray, n: int) -> float:
    support = probs > 0
    expected = n * probs[support]
    return float(np.sum((counts[support] - expected) ** 2 / expected))


@pytest.mark.parametrize("temperature,top_p", [(0.5, 1.0), (2.0, 1.0), (1.3, 0.7)])
def test_sampled_frequencies_follow_the_hf_distribution(temperature, top_p):
    n, v = 20_000, 12
    row = (np.random.default_rng(7).normal(size=(1, V)) * 1.5).astype(np.float32)
    row[:, v:] = -np.inf  # a small support, so every count is large
    probs = _hf_probs(row, temperature, top_p, None)[0]
    keys = jax.random.split(jax.random.key(123), n)
    draw = jax.jit(lambda x, k: sample(x, k, temperature=temperature, top_p=top_p, vocab_limit=None))
    draws = np.asarray(draw(np.repeat(row, n, axis=0), keys))
    counts = np.bincount(draws, minlength=V)
    assert counts[probs == 0].sum() == 0  # nothing outside the nucleus
    support = int((probs > 0).sum())
    bound = _chi2_bound(support - 1)
    assert _chi2(counts, probs, n) < bound
    # The bound is tight enough to reject the distribution of a neighbouring temperature.
    wrong = _hf_probs(row, temperature * 1.15, top_p, None)[0]
    assert _chi2(counts, np.where(probs > 0, wrong, 0) / wrong[probs > 0].sum(), n) > bound
