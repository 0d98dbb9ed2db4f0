"""KV-cache generation against HF `generate` and against full recomputation without a cache.

Tiny models use a larger init (HF initializer_range 0.3) so greedy decoding doesn't collapse onto
one repeated token, which would make token equality a weak check. The image path is compared with
our own no-cache forward here, and with HF `generate` on the exported Llava models in
test_generate_llava.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_tiny import IMAGE_TOKEN_ID, hf_qwen2, our_config, state_dict_np
from oq2vl_jax.generate import Generator, Prompt, decode_step, pad_batch, prefill, sample
from oq2vl_jax.models import build, load_hf

STEPS = 10
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def text_models():
    hf = hf_qwen2(initializer_range=0.3)
    ours = build(our_config(hf_text=hf))
    load_hf(ours, language_model=state_dict_np(hf))
    return hf, ours


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)  # ids below IMAGE_TOKEN_ID: text only
    return [rng.integers(1, IMAGE_TOKEN_ID, n).tolist() for n in lengths]


def _hf_generate(hf, ids, eos=None):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=STEPS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_matches_hf_generate_batched_and_one_by_one(text_models):
    hf, ours = text_models
    prompts = _prompts([5, 13, 2, 8])
    expected = [_hf_generate(hf, p) for p in prompts]
    assert len({tuple(e) for e in expected}) == len(expected) and all(len(set(e)) > 3 for e in expected)
    gen = Generator(ours, pad_id=0, pad_multiple=8)
    # One batch of 4 (left-padded to 16), chunks of 3 (the last one filled with empty rows), and one by one.
    for batch_size in (4, 3, 1):
        got = gen([Prompt(p) for p in prompts], max_new_tokens=STEPS, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"
    assert gen.stats.new_tokens == 3 * 4 * STEPS


def test_stop_token_matches_hf(text_models):
    hf, ours = text_models
    prompts = _prompts([6, 9], seed=1)
    first = _hf_generate(hf, prompts[0])
    eos = first[3]  # row 0 stops at its 4th token, row 1 wherever (or never) it emits the same id
    expected = [_hf_generate(hf, p, eos=eos) for p in prompts]
    assert expected[0] == first[:first.index(eos) + 1]
    got = Generator(ours, pad_id=0, stop_ids=[eos])([Prompt(p) for p in prompts], max_new_tokens=STEPS)
    assert got == expected


def _no_cache_logits(model, ids, images):
    """Logits [T, V] of a full forward over one unpadded row (no cache)."""
    img = None if images is None else np.asarray(images)[None]
    return np.asarray(nnx.jit(lambda m, i, x: m(i, x))(model, np.asarray(ids, np.int32)[None], img)[0])


def _check_cache_against_recompute(model, prompts, multiple):
    """Greedy-decodes with prefill + decode_step on a left-padded batch, then checks every step's
    logits against a no-cache forward of each row's prompt plus its generated tokens: by causality,
    position t of that forward is what recomputing the prefix up to t at each step would give."""
    b = len(prompts)
    ids, pos, valid, images = pad_batch(prompts, b, pad_id=0, image_size=model.cfg.vision.image_size,
                                        multiple=multiple)
    assert valid.sum(1).min() < ids.shape[1]  # some row is really padded
    logits, cache = nnx.jit(prefill, static_argnames="max_len")(model, ids, images, pos, valid,
                                                                 max_len=ids.shape[1] + STEPS)
    step = nnx.jit(decode_step)
    next_pos = valid.sum(1).astype(np.int32)
    cached, tokens = [], []
    for s in range(STEPS):
        cached.append(np.asarray(logits))
        tokens.append(cached[-1].argmax(-1).astype(np.int32))
        logits, cache = step(model, cache, tokens[-1], next_pos + s)
    cached, tokens = np.stack(cached, 1), np.stack(tokens, 1)  # [B, STEPS, V], [B, STEPS]
    for r, p in enumerate(prompts):
        n = len(p.ids)
        ref = _no_cache_logits(model, list(p.ids) + tokens[r, :-1].tolist(), p.images)[n - 1:]
        np.testing.assert_allclose(cached[r], ref, atol=LOGIT_TOL, rtol=0, err_msg=f"row {r}")
    return tokens.tolist()


def test_cache_equals_no_cache_text(text_models):
    _, ours = text_models
    prompts = [Prompt(p) for p in _prompts([7, 3, 12], seed=2)]
    tokens = _check_cache_against_recompute(ours, prompts, multiple=16)
    assert tokens == Generator(ours, pad_id=0)(prompts, max_new_tokens=STEPS)


def test_cache_equals_no_cache_with_images():
    """Prefill splices images at their placeholder slots in left-padded rows with different image
    counts (the second row's missing image slot is zero-filled and never used)."""
    hf = hf_qwen2(initializer_range=0.3)
    cfg = our_config(hf_text=hf, image_tokens=4)
    model = build(cfg, seed=1)
    load_hf(model, language_model=state_dict_np(hf))
    k, s = cfg.image_tokens, cfg.vision.image_size
    rng = np.random.default_rng(3)
    img = lambda n: rng.uniform(-1, 1, (n, s, s, 3)).astype(np.float32)  # noqa: E731
    bos, nl = 1, 2
    prompts = [
        Prompt([bos] + [IMAGE_TOKEN_ID] * k + [nl, 5, 6] + [IMAGE_TOKEN_ID] * k + [nl, 7, 8, 9], img(2)),
        Prompt([bos] + [IMAGE_TOKEN_ID] * k + [nl, 11], img(1)),
        Prompt([bos, 20, 21, 22]),
    ]
    tokens = _check_cache_against_recompute(model, prompts, multiple=8)
    # The images matter: other pixels give other logits.
    swapped = dataclasses.replace(prompts[1], images=img(1))
    assert not np.allclose(_no_cache_logits(model, swapped.ids, swapped.images)[-1],
                           _no_cache_logits(model, prompts[1].ids, prompts[1].images)[-1], atol=1e-3)
    assert tokens == Generator(model, pad_id=0, pad_multiple=8)(prompts, max_new_tokens=STEPS, batch_size=2)


def _keys(n, seed=1):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), np.arange(n))


def test_sampling():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    keys = _keys(4)
    greedy = np.asarray(sample(logits, keys, temperature=0.0, top_p=1.0, vocab_limit=None))
    np.testing.assert_array_equal(greedy, np.asarray(logits).argmax(-1))
    # A vanishing nucleus keeps only the most likely token.
    np.testing.assert_array_equal(sample(logits, keys, temperature=1.0, top_p=1e-6, vocab_limit=None), greedy)
    # Ids past the tokenizer are never chosen, even when most likely.
    boosted = logits.at[:, 45:].add(100.0)
    assert np.asarray(sample(boosted, keys, temperature=0.0, top_p=1.0, vocab_limit=45)).max() < 45
    draws = np.stack([np.asarray(sample(logits, _keys(4, i), temperature=1.0, top_p=0.9, vocab_limit=45))
                      for i in range(20)])
    assert draws.max() < 45 and len(np.unique(draws[:, 0])) > 1  # it does sample
    # The nucleus: every drawn token lies within the top-p set of its row.
    probs = np.asarray(jax.nn.softmax(np.where(np.arange(50) < 45, np.asarray(logits), -np.inf), -1))
    for r in range(4):
        order = np.argsort(-probs[r])
        mass_before = np.cumsum(probs[r][order]) - probs[r][order]
        allowed = set(order[mass_before < 0.9].tolist())
        assert set(draws[:, r].tolist()) <= allowed


def test_top_p_nucleus_is_by_rank_with_ties():
    # Four equally likely tokens: top_p 0.5 keeps two of them (as HF's TopPLogitsWarper), not all
    # four tied at the threshold; (.3, .3, .3, .1) with top_p 0.4 keeps two as well.
    for probs, top_p in (([0.25] * 4, 0.5), ([0.3, 0.3, 0.3, 0.1], 0.4)):
        logits = jnp.log(jnp.tile(jnp.asarray(probs), (400, 1)))
        drawn = np.asarray(sample(logits, _keys(400), temperature=1.0, top_p=top_p, vocab_limit=None))
        assert len(np.unique(drawn)) == 2, (probs, np.unique(drawn))


def test_seeded_sampling_is_reproducible(text_models):
    _, ours = text_models
    prompts = [Prompt(p) for p in _prompts([4, 9], seed=4)]
    gen = Generator(ours, pad_id=0)
    a = gen(prompts, max_new_tokens=STEPS, temperature=1.0, top_p=0.9, seed=7)
    b = gen(prompts, max_new_tokens=STEPS, temperature=1.0, top_p=0.9, seed=7)
    c = gen(prompts, max_new_tokens=STEPS, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_sampled_tokens_do_not_depend_on_the_batch(text_models):
    # Request i samples with key (seed, i): the same request draws the same tokens alone, in a
    # batch with others, and at another batch size.
    _, ours = text_models
    prompts = [Prompt(p) for p in _prompts([4, 9, 6], seed=5)]
    gen = Generator(ours, pad_id=0)
    kw = dict(max_new_tokens=STEPS, temperature=1.0, top_p=0.95, seed=3)
    together = gen(prompts, batch_size=3, **kw)
    assert gen(prompts, batch_size=1, **kw) == together
    assert gen(prompts, batch_size=2, **kw) == together
    assert len({tuple(t) for t in together}) == 3
