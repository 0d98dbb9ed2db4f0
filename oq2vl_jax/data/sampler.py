"""The original's split-modality, length-grouped batch order for unpacked SFT (prismatic's
SplitModalitySampler, itself LLaVA's), as a pure function of (modality, length) per row.

Per epoch: the rows with and without images are shuffled separately and cut into global batches (a
short last batch is topped up with the first rows of its modality's first batch, so a few rows repeat);
each batch is sorted by length and dealt greedily into `replicas` equal parts (the next-longest row to
the part with the least total length), so each data shard's rows have similar lengths; the batches of
both modalities are shuffled together and the batch holding the longest row goes first (an
out-of-memory shows at once). Every global batch is therefore one modality.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _deal(lengths: np.ndarray, parts: int) -> np.ndarray:
    """Positions of each batch's length-sorted rows ([batches, n], descending) after dealing them into
    `parts` equal parts: each row goes to the unfilled part with the least total length, the
    lowest-numbered on ties; a part's rows keep their dealing order. All batches at once."""
    nb, n = lengths.shape
    per = n // parts
    totals = np.zeros((nb, parts), np.float64)
    counts = np.zeros((nb, parts), np.int64)
    dest = np.empty((nb, n), np.int64)
    rows = np.arange(nb)
    for j in range(n):
        k = np.argmin(totals, axis=1)  # first minimum: the lowest part on ties
        dest[:, j] = k * per + counts[rows, k]
        counts[rows, k] += 1
        totals[rows, k] += lengths[:, j]
        totals[rows, k] = np.where(counts[rows, k] == per, np.inf, totals[rows, k])
    return dest


def _batches(rows: np.ndarray, lengths: np.ndarray, gbs: int, parts: int, permute) -> np.ndarray:
    """[batches, gbs] row indices of one modality: shuffled, the last batch topped up from the first,
    each batch sorted by length (descending, stable) and dealt into parts."""
    if not len(rows):
        return np.zeros((0, gbs), np.int64)
    order = np.asarray(permute(len(rows)), np.int64)
    short = -len(order) % gbs
    if short:
        order = np.concatenate([order, order[:short]])
    batches = order.reshape(-1, gbs)
    lens = lengths[batches]
    by_len = np.argsort(-lens, axis=1, kind="stable")
    batches = np.take_along_axis(batches, by_len, axis=1)
    dest = _deal(np.take_along_axis(lens, by_len, axis=1), parts)
    out = np.empty_like(batches)
    np.put_along_axis(out, dest, batches, axis=1)
    return rows[out]


def modality_length_order(has_image: Sequence[bool], lengths: Sequence[int], global_batch: int, replicas: int,
                          permute: Callable[[int], Sequence[int]]) -> np.ndarray:
    """One epoch's row order; its length is a multiple of global_batch. `permute(n)` returns a random
    permutation of range(n) and is called three times, in the original's order (image rows, text
    rows, batches)."""
    if global_batch % replicas:
        raise ValueError(f"global batch {global_batch} is not a multiple of {replicas} replicas")
    has_image, lengths = np.asarray(has_image, bool), np.asarray(lengths, np.int64)
    mm, uni = np.flatnonzero(has_image), np.flatnonzero(~has_image)
    merged = np.concatenate([_batches(mm, lengths[mm], global_batch, replicas, permute),
                             _batches(uni, lengths[uni], global_batch, replicas, permute)])
    batches = merged[np.asarray(permute(len(merged)), np.int64)]
    longest = int(np.argmax(lengths[batches].max(axis=1)))
    batches[[0, longest]] = batches[[longest, 0]]
    return batches.ravel()


class EpochOrder:
    """Global position j -> row index, epoch after epoch (each epoch reordered with seed + epoch);
    picklable and index based, so a Grain map over it keeps a few-integer iterator state."""

    def __init__(self, has_image, lengths, global_batch: int, replicas: int, seed: int):
        self.has_image, self.lengths = np.asarray(has_image, bool), np.asarray(lengths, np.int64)
        self.global_batch, self.replicas, self.seed = global_batch, replicas, seed
        self._epoch, self._order = -1, None
        self.epoch_len = len(self._for(0))

    def _for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._order = modality_length_order(self.has_image, self.lengths, self.global_batch, self.replicas,
                                                rng.permutation)
            self._epoch = epoch
        return self._order

    def __call__(self, j: int) -> int:
        return int(self._for(j // self.epoch_len)[j % self.epoch_len])

    def __getstate__(self):
        return {**self.__dict__, "_epoch": -1, "_order": None}
