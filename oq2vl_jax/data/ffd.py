"""First-fit-decreasing bin packing (the original packer's algorithm, spec §5), in O(n log n).

The original recomputes every bin's sum for every item (O(n·bins)). Here a max segment tree over the
bins' remaining capacities finds the *leftmost* bin with enough room in O(log n), which is exactly the
bin first-fit picks, so the result equals ``first_fit_decreasing_reference`` item for item. An optional
second capacity (images per row) is searched the same way; a subtree is pruned when either maximum is
too small, which keeps the search exact (it may backtrack, but only through subtrees that can hold it).
"""
from __future__ import annotations

from collections.abc import Sequence


def _decreasing_order(lengths: Sequence[int]) -> list[int]:
    # Stable by input index among equal lengths, like the original's sorted(..., reverse=True).
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def first_fit_decreasing(lengths: Sequence[int], capacity: int, images: Sequence[int] | None = None,
                         max_images: int | None = None) -> list[list[int]]:
    """Packs item indices into bins of ``capacity`` (and at most ``max_images`` images per bin).

    Returns bins in opening order, each a list of item indices in placement order. Raises ValueError if
    an item alone cannot fit (callers filter those out first and count them as skipped).
    """
    n = len(lengths)
    if images is None or max_images is None:
        images, max_images = [0] * n, 0
    for i in range(n):
        if lengths[i] > capacity or lengths[i] <= 0:
            raise ValueError(f"item {i} has length {lengths[i]}, must be in [1, {capacity}]")
        if images[i] > max_images:
            raise ValueError(f"item {i} has {images[i]} images, more than max_images={max_images}")
    if n == 0:
        return []
    size = 1
    while size < n:
        size *= 2
    # Leaves are bins 0..size-1, all starting empty; the leftmost untouched leaf is the "new bin".
    room = [capacity] * (2 * size)
    img_room = [max_images] * (2 * size)
    bins: list[list[int]] = []

    def find(node: int, need: int, need_img: int) -> int:
        if room[node] < need or img_room[node] < need_img:
            return -1
        if node >= size:
            return node - size
        found = find(2 * node, need, need_img)
        return found if found >= 0 else find(2 * node + 1, need, need_img)

    for i in _decreasing_order(lengths):
        b = find(1, lengths[i], images[i])
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        node = b + size
        room[node] -= lengths[i]
        img_room[node] -= images[i]
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            img_room[node] = max(img_room[2 * node], img_room[2 * node + 1])
            node //= 2
    return bins


def first_fit_decreasing_reference(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The original's O(n²) algorithm (``first_fit_decreasing_with_ids``), kept for tests and benches."""
    bins: list[list[int]] = []
    sums: list[int] = []
    for i in _decreasing_order(lengths):
        for b in range(len(bins)):
            if sums[b] + lengths[i] <= capacity:
                bins[b].append(i)
                sums[b] += lengths[i]
                break
        else:
            bins.append([i])
            sums.append(lengths[i])
    return bins


def fill_rate(lengths: Sequence[int], bins: list[list[int]], capacity: int) -> float:
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * capacity) if bins else 0.0
