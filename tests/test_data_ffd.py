"""First-fit-decreasing: capacity, exactly-once placement, equality with the original, fill, speed."""
import time

import numpy as np
import pytest

from oq2vl_jax.data.ffd import fill_rate, first_fit_decreasing, first_fit_decreasing_reference


def _caption_lengths(n, seed, image_tokens=144):
    # Realistic pre-training mix: <s> + 144 image slots + "\n" + caption (lognormal, ~10-60 tokens) + eos.
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(3.2, 0.5, n).astype(int), 1, 400)
    return [int(t) + image_tokens + 3 for t in text]


def _original_ffd(lengths, capacity):
    """The original packer's first_fit_decreasing_with_ids, restated here so that it shares nothing
    with the code under test: a {sample id: length} dict ordered by length with Python's
    sorted(..., reverse=True) (stable: equal lengths stay in input order), each (id, length) pair put
    in the first open bin whose total stays within capacity, else in a new bin. The original re-sums
    each bin's lengths per item; a running total per bin is the same number."""
    by_length = dict(sorted({i: n for i, n in enumerate(lengths)}.items(), key=lambda kv: kv[1], reverse=True))
    bins, totals = [], []
    for sample_id, length in by_length.items():
        for b, total in enumerate(totals):
            if total + length <= capacity:
                bins[b].append(sample_id)
                totals[b] += length
                break
        else:
            bins.append([sample_id])
            totals.append(length)
    return bins


def _mixed_lengths(n, seed):
    # SFT-like: long-tailed, some near the row size.
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(6.0, 1.0, n), 20, 4096)]


@pytest.mark.parametrize("lengths", [_caption_lengths(3000, 0), _mixed_lengths(2000, 1),
                                     [4096] * 3 + [1] * 10, [7] * 100])
def test_ffd_capacity_once_and_equals_original(lengths):
    bins = first_fit_decreasing(lengths, 4096)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 4096 for b in bins)
    # The tree search picks the leftmost fitting bin, i.e. exactly what the original loop picks.
    assert bins == _original_ffd(lengths, 4096)
    assert first_fit_decreasing_reference(lengths, 4096) == bins  # the O(n^2) copy kept for benches


def test_ffd_fill_rate_at_least_original_and_high():
    lengths = _caption_lengths(10_000, 2)
    ours = first_fit_decreasing(lengths, 4096)
    ref = _original_ffd(lengths, 4096)
    assert fill_rate(lengths, ours, 4096) >= fill_rate(lengths, ref, 4096)
    assert fill_rate(lengths, ours, 4096) > 0.98


def test_ffd_deterministic_and_stable_ties():
    lengths = _mixed_lengths(1000, 3)
    assert first_fit_decreasing(lengths, 4096) == first_fit_decreasing(list(lengths), 4096)
    bins = first_fit_decreasing([5, 5, 5, 5], 10)
    assert bins == [[0, 1], [2, 3]]  # equal lengths keep input order
    ties = [3, 9, 3, 9, 3, 4, 9, 4]
    assert first_fit_decreasing(ties, 12) == _original_ffd(ties, 12) == [[1, 0], [3, 2], [6, 4], [5, 7]]


def _first_fit_brute_force(lengths, capacity, images, max_images, max_items=None):
    """First fit over the decreasing order, checking every open bin's sums directly."""
    ref, sums, imgs = [], [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b in range(len(ref)) if sums[b] + lengths[i] <= capacity
                  and imgs[b] + images[i] <= max_images and (max_items is None or len(ref[b]) < max_items)),
                 len(ref))
        if b == len(ref):
            ref.append([]), sums.append(0), imgs.append(0)
        ref[b].append(i)
        sums[b] += lengths[i]
        imgs[b] += images[i]
    return ref


def test_ffd_image_cap_exact():
    rng = np.random.default_rng(4)
    lengths = [int(x) for x in rng.integers(10, 300, 2000)]
    images = [int(x) for x in rng.integers(0, 3, 2000)]
    bins = first_fit_decreasing(lengths, 1024, images, max_images=4)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert all(sum(images[i] for i in b) <= 4 and sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert bins == _first_fit_brute_force(lengths, 1024, images, 4)


def test_ffd_sample_cap_exact():
    rng = np.random.default_rng(5)
    lengths = [int(x) for x in rng.integers(5, 60, 3000)]  # short documents: many per row
    images = [int(x) for x in rng.integers(0, 2, 3000)]
    bins = first_fit_decreasing(lengths, 1024, images, max_images=6, max_items=16)
    assert sorted(i for b in bins for i in b) == list(range(3000))
    assert max(len(b) for b in bins) == 16
    assert bins == _first_fit_brute_force(lengths, 1024, images, 6, max_items=16)


def test_ffd_rejects_items_that_cannot_fit():
    with pytest.raises(ValueError, match="length 11"):
        first_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="images"):
        first_fit_decreasing([3], 10, [5], max_images=4)
    assert first_fit_decreasing([], 10) == []


def test_ffd_fast_on_10k():
    lengths = _caption_lengths(10_000, 5)
    t = time.perf_counter()
    first_fit_decreasing(lengths, 4096, [1] * len(lengths), max_images=27)
    assert time.perf_counter() - t < 5.0
