"""Pure partition algorithms: split a sequence of weights into contiguous
runs, one per rank (broadcast mode's ownership). No torch, no model."""

from __future__ import annotations

from typing import Sequence

PARTITIONS = ("balanced", "greedy")


def _check_weights(weights: Sequence[int], parts: int) -> None:
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, got {parts!r}")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative")


def greedy_partition(weights: Sequence[int], parts: int) -> list[int]:
    """The seed's rule (InternEvo ParamAsyncBcastHandler): fill rank r and move on once
    its load exceeds 1.01x the floored average. Kept for comparison; it can leave the
    last ranks empty and overload the first (see tests)."""
    _check_weights(weights, parts)
    avg = float(sum(weights) // parts)
    owners, r, alloc = [], 0, 0
    for w in weights:
        owners.append(r)
        alloc += w
        if alloc > avg * 1.01 and r < parts - 1:
            r, alloc = r + 1, 0
    return owners


def _parts_needed(weights: Sequence[int], cap: int) -> int:
    count, load = 1, 0
    for w in weights:
        if load + w > cap:
            count, load = count + 1, w
        else:
            load += w
    return count


def balanced_partition(weights: Sequence[int], parts: int) -> list[int]:
    """Optimal contiguous partition: minimises the largest part's total weight.

    Binary search on the cap (greedy packing is an exact feasibility test for
    contiguous splits), then pack with the optimal cap. Among optimal splits it
    picks the one that gives every part at least one item when there are enough
    items, so no rank idles while another holds two parameters.
    """
    _check_weights(weights, parts)
    n = len(weights)
    if n == 0:
        return []
    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if _parts_needed(weights, mid) <= parts:
            hi = mid
        else:
            lo = mid + 1
    owners, r, load, count = [], 0, 0, 0
    for i, w in enumerate(weights):
        # move on when the cap is hit, or when the items left are just enough to give
        # each remaining part one (forced moves never break the cap: each item <= cap)
        if count and (load + w > lo or n - i <= parts - 1 - r):
            r, load, count = r + 1, 0, 0
        assert r < parts, "balanced_partition: packing overflowed (bug)"
        owners.append(r)
        load, count = load + w, count + 1
    return owners
