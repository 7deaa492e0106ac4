"""`kth_smallest` is the contract TIES's magnitude cut-off rests on: bit-identical to `torch.kthvalue`.

Each case feeds the same rows to both, split into chunks of uneven sizes (some empty), and compares the
float32 bit patterns, so a faster implementation of `selection.py` must keep every one of these answers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hubmerge.merging.selection import kth_smallest

SMALLEST_DENORMAL = struct.unpack("<f", struct.pack("<I", 1))[0]
LARGEST_DENORMAL = struct.unpack("<f", struct.pack("<I", 0x007FFFFF))[0]
SMALLEST_NORMAL = struct.unpack("<f", struct.pack("<I", 0x00800000))[0]
LARGEST_FINITE = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]


def bits(value: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", value))[0])


def chunked(rows: torch.Tensor, sizes: Sequence[int]) -> Callable[[], Iterator[torch.Tensor]]:
    """A re-iterable source of `rows` cut into column chunks of `sizes` (0 makes an empty chunk)."""
    assert sum(sizes) == rows.shape[1]

    def chunks() -> Iterator[torch.Tensor]:
        start = 0
        for size in sizes:
            yield rows[:, start : start + size].clone()
            start += size

    return chunks


def reference(rows: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    return [float(torch.kthvalue(row, k).values) if k >= 1 else 0.0 for row, k in zip(rows, ranks)]


def check(rows: torch.Tensor, ranks: Sequence[int], sizes: Sequence[int] | None = None) -> list[float]:
    rows = rows.to(torch.float32)
    got = kth_smallest(chunked(rows, sizes or [rows.shape[1]]), ranks)
    want = reference(rows, ranks)
    assert [bits(v) for v in got] == [bits(v) for v in want], (got, want)
    return got


def uneven(n: int) -> list[int]:
    """Chunk sizes 0, 1, 2, 3, ... (with empty chunks between) covering n columns."""
    sizes, size, left = [0], 1, n
    while left:
        take = min(size, left)
        sizes += [take, 0] if size % 3 == 0 else [take]
        left -= take
        size += 1
    return sizes


@pytest.mark.slow
def test_ranks_one_and_n_are_the_minimum_and_maximum():
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(3, 1000, generator=g)
    n = rows.shape[1]
    got = check(rows, [1, n, 1], uneven(n))
    assert (
        got[0] == float(rows[0].min()) and got[1] == float(rows[1].max()) and got[2] == float(rows[2].min())
    )


def test_a_single_value_is_its_own_kth_value():
    assert check(torch.tensor([[0.375]]), [1]) == [0.375]
    assert check(torch.tensor([[0.375]]), [1], [0, 1, 0]) == [0.375]


@pytest.mark.slow
def test_all_zeros_give_zero_at_every_rank():
    rows = torch.zeros(2, 50)
    for k in (1, 25, 50):
        assert check(rows, [k, k], uneven(50)) == [0.0, 0.0]


def test_many_ties_pick_the_tied_value_at_every_rank_inside_the_run():
    # 0 × 10, 0.5 × 80, 1 × 10, shuffled: ranks 11..90 all land on 0.5, 10 and 91 just outside.
    values = torch.tensor([0.0] * 10 + [0.5] * 80 + [1.0] * 10)
    rows = values[torch.randperm(100, generator=torch.Generator().manual_seed(1))][None]
    assert check(rows, [10], uneven(100)) == [0.0]
    assert check(rows, [11], uneven(100)) == [0.5]
    assert check(rows, [90], uneven(100)) == [0.5]
    assert check(rows, [91], uneven(100)) == [1.0]


@pytest.mark.slow
def test_values_sharing_the_top_16_bits_are_told_apart_by_the_low_bits():
    # Neighbouring float32 values above 1.0: one coarse bucket, resolved only by the second pass.
    ones = [struct.unpack("<f", struct.pack("<I", 0x3F800000 + i))[0] for i in range(0, 4000, 7)]
    rows = torch.tensor(ones[::-1])[None]
    for k in (1, 2, len(ones) // 2, len(ones)):
        check(rows, [k], uneven(len(ones)))


def test_denormals_zero_and_the_smallest_normal_are_ordered_exactly():
    values = [0.0, SMALLEST_DENORMAL, 2 * SMALLEST_DENORMAL, LARGEST_DENORMAL, SMALLEST_NORMAL, 0.0]
    rows = torch.tensor(values)[None]
    got = [check(rows, [k], [2, 0, 3, 1])[0] for k in range(1, 7)]
    assert got == [0.0, 0.0, SMALLEST_DENORMAL, 2 * SMALLEST_DENORMAL, LARGEST_DENORMAL, SMALLEST_NORMAL]


@pytest.mark.slow
def test_values_spanning_the_whole_float32_exponent_range_and_infinity():
    exponents = torch.arange(-149, 128, dtype=torch.float64)
    values = torch.cat([(2.0**exponents).float(), torch.tensor([LARGEST_FINITE, float("inf"), 0.0])])
    rows = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(2))][None]
    n = rows.shape[1]
    for k in (1, 2, 3, n // 2, n - 2, n - 1, n):
        check(rows, [k], uneven(n))
    assert check(rows, [n], [n])[0] == float("inf")
    assert check(rows, [n - 1], [n])[0] == LARGEST_FINITE


def test_several_rows_each_get_their_own_rank():
    g = torch.Generator().manual_seed(3)
    rows = torch.stack([torch.rand(300, generator=g), torch.rand(300, generator=g) * 1e-30, torch.zeros(300)])
    rows[2, ::7] = 2.0**-140  # a denormal among zeros
    check(rows, [1, 150, 300], uneven(300))
    check(rows, [300, 1, 258], uneven(300))
    check(rows, [257, 7, 259], [300])


def test_a_rank_below_one_keeps_everything_with_a_zero_cut_off():
    rows = torch.rand(3, 20, generator=torch.Generator().manual_seed(4)) + 1
    assert kth_smallest(chunked(rows, [7, 0, 13]), [0, 0, 0]) == [0.0, 0.0, 0.0]
    got = kth_smallest(chunked(rows, [7, 0, 13]), [0, 5, -1])
    assert got[0] == 0.0 and got[2] == 0.0 and got[1] == float(torch.kthvalue(rows[1], 5).values)


@pytest.mark.slow
def test_chunking_never_changes_the_answer():
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(2, 2000, generator=g).abs() * 2.0 ** torch.randint(-60, 60, (2, 2000), generator=g)
    ranks = [1, 1999]
    whole = kth_smallest(chunked(rows, [2000]), ranks)
    for sizes in ([1] * 2000, uneven(2000), [0, 2000, 0], [1999, 1], [1, 1999]):
        assert kth_smallest(chunked(rows, sizes), ranks) == whole
    check(rows, ranks)


magnitudes = st.one_of(
    st.floats(min_value=0, allow_nan=False, allow_infinity=True, width=32),
    st.sampled_from([0.0, SMALLEST_DENORMAL, SMALLEST_NORMAL, 1.0, LARGEST_FINITE]),  # make ties likely
)


@st.composite
def selections(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], list[int]]:
    n_rows = draw(st.integers(1, 4))
    n_cols = draw(st.integers(1, 60))
    values = draw(st.lists(magnitudes, min_size=n_rows * n_cols, max_size=n_rows * n_cols))
    rows = torch.tensor(values, dtype=torch.float32).reshape(n_rows, n_cols)
    ranks = draw(st.lists(st.integers(-1, n_cols), min_size=n_rows, max_size=n_rows))
    cuts = sorted(draw(st.lists(st.integers(0, n_cols), max_size=6)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n_cols])]
    return rows, ranks, sizes


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True)
@given(selections())
def test_kth_smallest_equals_torch_kthvalue_on_generated_rows(case):
    rows, ranks, sizes = case
    check(rows, ranks, sizes)


@pytest.mark.parametrize("seed", range(3))
def test_kth_smallest_equals_torch_kthvalue_on_large_random_magnitudes(seed):
    g = torch.Generator().manual_seed(seed)
    n = 50_000
    rows = (torch.randn(3, n, generator=g) * 0.02).abs()
    rows[1] = rows[1].to(torch.bfloat16).float()  # bf16 task vectors: many exact ties
    rows[2, : n // 3] = 0.0  # trimmed-away zeros
    ranks = [int(torch.randint(1, n + 1, (), generator=g)) for _ in range(3)]
    check(rows, ranks, [n // 7, 0, n // 3, n - n // 7 - n // 3])
