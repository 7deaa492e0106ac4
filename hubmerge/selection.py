"""Exact k-th smallest magnitude over data too large to hold: a two-pass radix selection.

TIES keeps, per task vector, the entries whose |τ| reaches the k-th smallest magnitude of the whole
model (FusionBench's `kthvalue` over one flattened vector). For non-negative float32 values the IEEE
bit pattern, read as an integer, orders exactly like the value. Pass 1 counts the top 16 bits of every
magnitude; the bucket holding rank k is then resolved by counting the low 16 bits of the values in that
bucket in pass 2. Memory is two 65 536-bin histograms per model, whatever the model size, and the
result is bit-identical to `torch.kthvalue`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["kth_smallest"]

_BINS = 1 << 16


def _locate(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th smallest count (1-based), and the rank within that bin."""
    cumulative = histogram.cumsum(0)
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
    before = int(cumulative[index - 1]) if index else 0
    return index, rank - before


def kth_smallest(chunks: Callable[[], Iterable[torch.Tensor]], ranks: Sequence[int]) -> list[float]:
    """The ranks[i]-th smallest value (1-based) of row i over all chunks.

    `chunks()` must yield float32 tensors of shape (len(ranks), m) holding non-negative values, the same
    values each time it is called (it is called twice). A rank below 1 yields 0.0, which keeps everything.
    """
    n = len(ranks)
    coarse = torch.zeros(n, _BINS, dtype=torch.int64)
    for chunk in chunks():
        bits = chunk.contiguous().view(torch.int32) >> 16
        for i in range(n):
            coarse[i] += torch.bincount(bits[i], minlength=_BINS)
    wanted = [(i, *_locate(coarse[i], rank)) for i, rank in enumerate(ranks) if rank >= 1]
    if not wanted:
        return [0.0] * n
    fine = torch.zeros(n, _BINS, dtype=torch.int64)
    for chunk in chunks():
        bits = chunk.contiguous().view(torch.int32)
        for i, high, _ in wanted:
            row = bits[i]
            fine[i] += torch.bincount(row[(row >> 16) == high] & 0xFFFF, minlength=_BINS)
    result = [0.0] * n
    for i, high, rank_in_bin in wanted:
        low, _ = _locate(fine[i], rank_in_bin)
        result[i] = float(torch.tensor((high << 16) | low, dtype=torch.int32).view(torch.float32))
    return result
