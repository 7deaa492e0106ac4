"""Exact k-th smallest magnitude over data too large to hold, in one streaming pass when a sample allows.

TIES keeps, per task vector, the entries whose |τ| reaches the k-th smallest magnitude of the whole
model (FusionBench's `kthvalue` over one flattened vector). For non-negative float32 values the IEEE
bit pattern, read as an integer, orders exactly like the value, so every count here is on bit patterns.

With a bracket [lo, hi] per row (from `bracket`, over a small sample of the values), one pass counts the
values below lo and histograms the bit patterns inside the bracket (a few thousand to a million bins,
one clamp and one bincount per row and chunk):
if rank k lands inside, the histogram names the exact k-th value. A row whose bracket missed (an
unrepresentative sample) is resolved by the two-pass radix selection: pass 1 counts the top 16 bits of
every value; pass 2 counts the low 16 bits of the values in the bucket holding rank k. Either way the
result is bit-identical to `torch.kthvalue`, and memory is a few histograms per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["bracket", "kth_smallest"]

_BINS = 1 << 16
_MAX_BRACKET_BINS = 1 << 22  # a wider bracket (a flat, heavily quantised sample) goes to the radix passes
_INFINITY_BITS = 0x7F800000
_NARROW_BINS = 4  # up to this many bit patterns in a bracket, one compare-and-count pass each
_BINNED_AT_ONCE = 1 << 22  # values inside a wide bracket held (16 MiB) before they are binned


def _locate(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th smallest count (1-based), and the rank within that bin."""
    cumulative = histogram.cumsum(0)
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
    before = int(cumulative[index - 1]) if index else 0
    return index, rank - before


def _as_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def _bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


def bracket(sample: torch.Tensor, ranks: Sequence[int], total: int) -> list[tuple[float, float]]:
    """Per row of `sample` (n, s), an interval [lo, hi] likely to hold the ranks[i]-th smallest of `total`.

    Closed at both ends: on quantised data (bf16 fine-tunes) the answer is often a value the sample holds
    many times, the very one at the margin's edge.

    The sample's quantile at ranks[i] / total, widened by a margin well beyond its sampling error
    (sqrt(q(1 - q) / s) for independent draws; rows of a tensor are drawn in blocks, so more is allowed).
    A wrong guess costs time, never correctness: `kth_smallest` checks it with exact counts.
    """
    s = sample.shape[1]
    rows = sample.to("cpu", torch.float32).contiguous().numpy()
    result = []
    for row, rank in zip(rows, ranks, strict=True):
        q = min(max(rank / total, 0.0), 1.0)
        margin = 0.002 + 10 * math.sqrt(q * (1 - q) / max(s, 1))
        low, high = math.floor(s * (q - margin)) - 1, math.ceil(s * (q + margin))
        # Two order statistics, not a sort: a partition is linear in the sample (6x cheaper at 2 M values).
        picks = [i for i in (low, high) if 0 <= i < s]
        row = np.partition(row, picks) if picks else row
        lo = float(row[low]) if low >= 0 else 0.0
        hi = float(row[high]) if high < s else math.inf
        result.append((lo, hi))
    return result


def _radix(chunks: Callable[[], Iterable[torch.Tensor]], wanted: dict[int, int], result: list[float]) -> None:
    """Two exact passes for the rows in `wanted` (row -> rank); answers written into `result`."""
    coarse = {i: torch.zeros(_BINS, dtype=torch.int64) for i in wanted}
    for chunk in chunks():
        bits = chunk.contiguous().view(torch.int32) >> 16
        for i in wanted:
            coarse[i] += torch.bincount(bits[i], minlength=_BINS)
    buckets = {i: _locate(coarse[i], rank) for i, rank in wanted.items()}
    fine = {i: torch.zeros(_BINS, dtype=torch.int64) for i in wanted}
    for chunk in chunks():
        bits = chunk.contiguous().view(torch.int32)
        for i, (high, _) in buckets.items():
            row = bits[i]
            fine[i] += torch.bincount(row[(row >> 16) == high] & 0xFFFF, minlength=_BINS)
    for i, (high, rank_in_bin) in buckets.items():
        low, _ = _locate(fine[i], rank_in_bin)
        result[i] = _as_float((high << 16) | low)


class _Bracket:
    """One row's exact counts against its bracket [lo, hi) of bit patterns: the values below lo, and a
    histogram of those inside.

    numpy's compare-and-count is one vectorised pass at a fraction of a nanosecond a value, 5-10× cheaper
    than torch's clamp + bincount over every value (bench/RESULTS.md). A bracket of a few bit patterns
    (TIES on bf16 task vectors: the cut-off is one value held by millions of entries) needs one count per
    pattern. A wider one counts below it and keeps the values inside it (a few percent of them), binned a
    few million at a time: a bracket can span millions of bit patterns (quantised data puts its ends on
    two values far apart in bits), and a histogram that size per chunk costs more than the chunk itself.
    """

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.below = 0
        self.inside = np.zeros(hi - lo, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._held = 0

    def count(self, row: np.ndarray) -> None:
        lo, hi = self.lo, self.hi
        if hi - lo <= _NARROW_BINS:
            counts = [int(np.count_nonzero(row < edge)) for edge in range(lo, hi + 1)]
            self.inside += np.diff(counts)
            self.below += counts[0]
            return
        offset = row - np.int32(lo)  # [lo, hi) becomes [0, hi - lo), the rest negative or larger
        chosen = offset[offset.view(np.uint32) < np.uint32(hi - lo)]  # one unsigned compare for both ends
        self.below += int(np.count_nonzero(offset < 0))
        self._pending.append(chosen)
        self._held += chosen.size
        if self._held >= _BINNED_AT_ONCE:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.inside += np.bincount(np.concatenate(self._pending), minlength=self.hi - self.lo)
            self._pending, self._held = [], 0


def kth_smallest(
    chunks: Callable[[], Iterable[torch.Tensor]],
    ranks: Sequence[int],
    brackets: Sequence[tuple[float, float]] | None = None,
) -> list[float]:
    """The ranks[i]-th smallest value (1-based) of row i over all chunks.

    `chunks()` must yield float32 tensors of shape (len(ranks), m) holding non-negative values, the same
    values each time it is called. It is called once when every row's answer lies in its bracket
    [lo, hi], twice more for the rows where it does not (or without brackets). A rank below 1 yields 0.0,
    which keeps everything.
    """
    n = len(ranks)
    result = [0.0] * n
    wanted = {i: rank for i, rank in enumerate(ranks) if rank >= 1}
    if brackets is not None and wanted:
        # Bit patterns: [lo, hi] as the integers [lo, hi + 1).
        bounds = {}
        for i in wanted:
            lo = _bits(brackets[i][0])
            hi = _bits(brackets[i][1]) + 1 if brackets[i][1] < math.inf else _INFINITY_BITS + 1
            if hi - lo <= _MAX_BRACKET_BINS:
                bounds[i] = (lo, hi)
        counted = {i: _Bracket(lo, hi) for i, (lo, hi) in bounds.items()}
        if counted:
            for chunk in chunks():
                bits = chunk.contiguous().view(torch.int32).numpy()
                for i, row in counted.items():
                    row.count(bits[i])
        for i, row in counted.items():
            row.flush()
            rank_in = wanted[i] - row.below
            if 1 <= rank_in <= int(row.inside.sum()):
                result[i] = _as_float(row.lo + _locate(torch.from_numpy(row.inside), rank_in)[0])
                del wanted[i]
    if wanted:
        _radix(chunks, wanted, result)
    return result
