"""First-fit-decreasing bin packing (the original packer's algorithm, docs/original_system.md §5), in O(n log n).

The original recomputes every bin's sum for every item (O(n·bins)). Here a max segment tree over the
bins' remaining capacities finds the *leftmost* bin with enough room in O(log n), which is exactly the
bin first-fit picks, so the result equals ``first_fit_decreasing_reference`` item for item. Optional
further capacities (images per row, samples per row) are searched the same way; a subtree is pruned
when any maximum is too small, which keeps the search exact (it may backtrack, but only through
subtrees that can hold it).
"""
from __future__ import annotations

from collections.abc import Sequence


def _decreasing_order(lengths: Sequence[int]) -> list[int]:
    # Stable by input index among equal lengths, like the original's sorted(..., reverse=True).
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def first_fit_decreasing(lengths: Sequence[int], capacity: int, images: Sequence[int] | None = None,
                         max_images: int | None = None, max_items: int | None = None) -> list[list[int]]:
    """Packs item indices into bins of ``capacity``, with at most ``max_images`` images and at most
    ``max_items`` items per bin when given (the latter bounds segments per row for the cuDNN layout).

    Returns bins in opening order, each a list of item indices in placement order. Raises ValueError if
    an item alone cannot fit (callers filter those out first and count them as skipped).
    """
    n = len(lengths)
    # Every constraint is a (per-item amount, per-bin cap) resource, searched the same way.
    resources = [(list(lengths), capacity)]
    if images is not None and max_images is not None:
        resources.append((list(images), max_images))
    if max_items is not None:
        resources.append(([1] * n, max_items))
    for i in range(n):
        if lengths[i] > capacity or lengths[i] <= 0:
            raise ValueError(f"item {i} has length {lengths[i]}, must be in [1, {capacity}]")
        if images is not None and max_images is not None and images[i] > max_images:
            raise ValueError(f"item {i} has {images[i]} images, more than max_images={max_images}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    if n == 0:
        return []
    size = 1
    while size < n:
        size *= 2
    # Leaves are bins 0..size-1, all starting empty; the leftmost untouched leaf is the "new bin".
    # rooms[r][node] = the most room for resource r in any bin below node.
    rooms = [[cap] * (2 * size) for _, cap in resources]
    bins: list[list[int]] = []

    def find(node: int, need: list[int]) -> int:
        if any(room[node] < k for room, k in zip(rooms, need)):
            return -1
        if node >= size:
            return node - size
        found = find(2 * node, need)
        return found if found >= 0 else find(2 * node + 1, need)

    for i in _decreasing_order(lengths):
        need = [amounts[i] for amounts, _ in resources]
        b = find(1, need)
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        node = b + size
        for room, k in zip(rooms, need):
            room[node] -= k
        node //= 2
        while node:
            for room in rooms:
                room[node] = max(room[2 * node], room[2 * node + 1])
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
