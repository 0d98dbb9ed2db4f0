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


def _deal(batch: list[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Rows of one length-sorted batch dealt into `parts` equal parts by least total length."""
    per = len(batch) // parts
    out: list[list[int]] = [[] for _ in range(parts)]
    total = [0.0] * parts
    for i in batch:
        k = total.index(min(total))
        out[k].append(i)
        total[k] += lengths[i]
        if len(out[k]) == per:
            total[k] = float("inf")
    return out


def _batches(rows: list[int], lengths: list[int], gbs: int, parts: int, permute) -> list[list[int]]:
    if not rows:
        return []
    order = [int(i) for i in permute(len(rows))]
    batches = [order[i:i + gbs] for i in range(0, len(order), gbs)]
    batches[-1] += batches[0][:gbs - len(batches[-1])]
    out = []
    for b in batches:
        b = sorted(b, key=lambda i: lengths[i], reverse=True)
        out.append([rows[i] for part in _deal(b, lengths, parts) for i in part])
    return out


def modality_length_order(has_image: Sequence[bool], lengths: Sequence[int], global_batch: int, replicas: int,
                          permute: Callable[[int], Sequence[int]]) -> list[int]:
    """One epoch's row order; its length is a multiple of global_batch. `permute(n)` returns a random
    permutation of range(n) and is called three times, in the original's order (image rows, text
    rows, batches)."""
    if global_batch % replicas:
        raise ValueError(f"global batch {global_batch} is not a multiple of {replicas} replicas")
    mm = [i for i, m in enumerate(has_image) if m]
    uni = [i for i, m in enumerate(has_image) if not m]
    mm_len, uni_len = [lengths[i] for i in mm], [lengths[i] for i in uni]
    mm_b = _batches(mm, mm_len, global_batch, replicas, permute)
    uni_b = _batches(uni, uni_len, global_batch, replicas, permute)
    merged = mm_b + uni_b
    batches = [merged[int(i)] for i in permute(len(merged))]
    longest = int(np.argmax([max(lengths[i] for i in b) for b in batches]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for b in batches for i in b]


class EpochOrder:
    """Global position j -> row index, epoch after epoch (each epoch reordered with seed + epoch);
    picklable and index based, so a Grain map over it keeps a few-integer iterator state."""

    def __init__(self, has_image, lengths, global_batch: int, replicas: int, seed: int):
        self.has_image, self.lengths = np.asarray(has_image, bool), np.asarray(lengths, np.int64)
        self.global_batch, self.replicas, self.seed = global_batch, replicas, seed
        self._epoch, self._order = -1, None
        self.epoch_len = len(self._for(0))

    def _for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._order = modality_length_order(self.has_image.tolist(), self.lengths.tolist(), self.global_batch,
                                                self.replicas, rng.permutation)
            self._epoch = epoch
        return self._order

    def __call__(self, j: int) -> int:
        return self._for(j // self.epoch_len)[j % self.epoch_len]

    def __getstate__(self):
        return {**self.__dict__, "_epoch": -1, "_order": None}
