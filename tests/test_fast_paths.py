"""The speed paths give exactly the results of the plain ones.

- `kth_smallest` with a bracket answers in one pass, bit-identical to `torch.kthvalue`, and falls back to
  the exact radix passes when the bracket misses.
- The methods take models in their stored dtype (bf16, f16) and compute what upcast copies would, bit
  for bit; TIES' fused "sum" equals the general disjoint merge bit for bit.
- The lock's source hashing gives each file's sha256, and `cancel()` stops it before the next file.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hubmerge.merging import selection
from hubmerge.merging.methods import METHODS, Slice
from hubmerge.merging.methods.ties import _disjoint_merge
from hubmerge.merging.selection import bracket, kth_smallest
from hubmerge.publish.lock import SourceHashes


def _data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 50_000, generator=g) * 0.01).abs()
    x[:, :5000] = 0.0  # many exact ties, as trimmed or unchanged parameters give
    x[1, 5000:9000] = x[1, 9000:13000]
    return x.to(torch.bfloat16).float()  # quantised like bf16 task vectors: more ties still


def _counted(x: torch.Tensor, calls: list[int]):  # type: ignore[no-untyped-def]
    def chunks() -> Iterator[torch.Tensor]:
        calls.append(1)
        yield from x.split(7_000, dim=1)

    return chunks


def _kthvalue(x: torch.Tensor, ranks: list[int]) -> list[float]:
    return [float(row.kthvalue(k).values) if k >= 1 else 0.0 for row, k in zip(x, ranks)]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [[40_000] * 3, [30_000, 35_000, 45_000], [25_000, 40_000, 0]])
def test_bracketed_selection_is_one_pass_and_bit_identical_to_kthvalue(ranks: list[int]) -> None:
    x = _data()
    sample = x[:, ::5]
    calls: list[int] = []
    got = kth_smallest(_counted(x, calls), ranks, bracket(sample, ranks, x.shape[1]))
    want = _kthvalue(x, ranks)
    assert torch.equal(torch.tensor(got).view(torch.int32), torch.tensor(want).view(torch.int32))
    assert len(calls) == 1


@pytest.mark.parametrize("where", ["below", "above", "empty"])
def test_a_missed_bracket_falls_back_to_the_exact_passes(where: str) -> None:
    x = _data(1)
    ranks = [30_000, 41_000, 49_000]
    truth = _kthvalue(x, ranks)
    wrong = {
        "below": [(t * 0.8, t * 0.9) for t in truth],  # every answer above hi
        "above": [(t * 1.1, t * 1.2) for t in truth],  # every answer below lo
        "empty": [(1e9, 1.1e9)] * 3,
    }[where]
    calls: list[int] = []
    got = kth_smallest(_counted(x, calls), ranks, wrong)
    assert got == truth
    assert len(calls) == 3  # the bracketed pass, then both radix passes


@pytest.mark.parametrize("edge", ["lo", "hi"])
def test_an_answer_on_either_edge_of_the_bracket_is_found_in_one_pass(edge: str) -> None:
    """Quantised task vectors (Qwen2.5-1.5B-shaped bf16 fine-tunes) often put the k-th value exactly where
    the sample's margin ends: the bracket holds both of its ends (a half-open one cost two more reads)."""
    x = _data(3)
    ranks = [41_000, 30_000, 45_000]
    truth = _kthvalue(x, ranks)
    calls: list[int] = []
    edges = [(t, t * 1.1) if edge == "lo" else (t * 0.9, t) for t in truth]
    got = kth_smallest(_counted(x, calls), ranks, edges)
    assert torch.equal(torch.tensor(got).view(torch.int32), torch.tensor(truth).view(torch.int32))
    assert len(calls) == 1


@pytest.mark.parametrize("width", [0, 1, 4, 5, 1000, 1 << 21])
def test_narrow_and_wide_brackets_count_alike_and_match_kthvalue(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bracket of up to four bit patterns is counted with one compare per pattern, a wider one by binning
    the values inside it, a batch at a time (here a few hundred, so that batches end inside and between
    chunks): all find the k-th value in one pass, on a tie of thousands at the cut-off."""
    monkeypatch.setattr(selection, "_BINNED_AT_ONCE", 300)
    x = _data(4)
    value = x[:, 40_000].clone()  # each row's value there is held by other entries too (bf16)
    # Ranks on both edges of a tie and inside the tied zeros: a count off by one moves off the edges.
    ranks = [int((x[0] < value[0]).sum()) + 1, int((x[1] <= value[1]).sum()), 2_500]
    assert ranks[1] - int((x[1] < value[1]).sum()) > 1  # a tie indeed
    truth = _kthvalue(x, ranks)
    bits = torch.tensor(truth).view(torch.int32)
    lo = (bits - width // 2).clamp(min=0)
    edges = [
        (float(a), float(b))
        for a, b in zip(lo.view(torch.float32).tolist(), (lo + width).view(torch.float32).tolist())
    ]
    calls: list[int] = []
    got = kth_smallest(_counted(x, calls), ranks, edges)
    assert torch.equal(torch.tensor(got).view(torch.int32), bits)
    assert len(calls) == 1


@pytest.mark.parametrize("bracketed", [True, False])
def test_extreme_and_tied_ranks_match_kthvalue(bracketed: bool) -> None:
    x = _data(2)
    ranks = [1, 5000, 50_000]  # the smallest, the last of the tied zeros, the largest
    brackets = bracket(x[:, ::5], ranks, x.shape[1]) if bracketed else None
    assert kth_smallest(_counted(x, []), ranks, brackets) == _kthvalue(x, ranks)


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(200_000, generator=g) * 0.02).to(dtype)
    models = [
        (base.float() + torch.randn(200_000, generator=g) * torch.rand(200_000, generator=g) ** 4 * 0.01).to(
            dtype
        )
        for _ in range(3)
    ]
    models[1][:2000] = models[0][:2000]
    models[2][:2000] = base[:2000]  # unchanged entries: exact zeros in the task vector
    return base, models


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _merge(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    params: dict[str, object],
    weights: list[float] | None = None,
    stats: dict[str, object] | None = None,
) -> Any:
    """One slice through a registered method's merge step, as the engine calls it."""
    model_params = tuple({"weight": w, "density": 1.0} for w in weights or [1.0] * len(models))
    s = Slice("t", tuple(models[0].shape), 0, base, tuple(models), params, model_params)  # type: ignore[arg-type]
    return METHODS[method].merge(s, stats or {})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_methods_on_stored_dtype_models_equal_upcast_copies_bit_for_bit(dtype: torch.dtype) -> None:
    base, models = _inputs(dtype)
    b32, m32 = base.float(), [m.float() for m in models]
    mixed = [m32[0], *models[1:]]  # the engine upcasts only the first slice
    assert _same_bits(_merge("simple_average", None, mixed, {}), _merge("simple_average", None, m32, {}))
    weights = [0.3, 1.0, 2.5]
    linear = {"normalize": True}
    assert _same_bits(
        _merge("linear", None, mixed, linear, weights), _merge("linear", None, m32, linear, weights)
    )
    ta = {"scaling_factor": 0.8, "normalize": False, "rescale": False}
    assert _same_bits(
        _merge("task_arithmetic", b32, models, ta, [1.0, 0.7, 1.0]),
        _merge("task_arithmetic", b32, m32, ta, [1.0, 0.7, 1.0]),
    )
    cuts = [float((m - b32).abs().median()) for m in m32]
    for merge_func in ("sum", "mean", "max"):
        ties = {"scaling_factor": 0.8, "merge_func": merge_func}
        fast, plain = (
            _merge("ties", b32, models, ties, stats={"cut": cuts}),
            _merge("ties", b32, m32, ties, stats={"cut": cuts}),
        )
        assert _same_bits(fast.values, plain.values) and fast.tally == plain.tally
        assert torch.equal(fast.positions, plain.positions) and fast.positions.numel() > 0


def test_ties_fused_sum_equals_the_general_disjoint_merge_bit_for_bit() -> None:
    base, models = _inputs(torch.bfloat16)
    b32 = base.float()
    cuts = [float((m.float() - b32).abs().median()) for m in models]
    chunk = _merge("ties", b32, models, {"scaling_factor": 0.8, "merge_func": "sum"}, stats={"cut": cuts})
    tv = torch.stack([m.float() - b32 for m in models])
    tv = tv * (tv.abs() >= torch.tensor(cuts)[:, None])
    sign = torch.sign(tv.sum(0))
    merged = _disjoint_merge(tv, torch.where(sign == 0, 1.0, sign), "sum")
    assert _same_bits(chunk.values, b32 + 0.8 * merged)
    assert chunk.tally == int(sign.sum())
    assert torch.equal(chunk.positions, ((sign == 0) & (tv != 0).any(0)).nonzero().flatten())


def _fusionbench_ties(base: torch.Tensor, models: list[torch.Tensor], cuts: list[float], merge_func: str):  # type: ignore[no-untyped-def]
    """TIES on one slice, written out plainly (majority sign +1): mask, elect, merge. Trimmed entries are
    +0, as hubmerge has always written them (FusionBench's τ * mask gives -0 for a trimmed negative τ,
    which changes a bit only where the base is -0 and every τ there is trimmed)."""
    tv = torch.stack([m.float() - base for m in models])
    tv = torch.where(tv.abs() >= torch.tensor(cuts)[:, None], tv, torch.zeros(()))
    sign = torch.sign(tv.sum(0))
    return base + 0.8 * _disjoint_merge(tv, torch.where(sign == 0, 1.0, sign), merge_func), tv, sign


@pytest.mark.parametrize("cut_at", ["median", "zero", "exact"])
def test_ties_fast_trim_and_elected_sum_keep_every_bit_signed_zeros_included(cut_at: str) -> None:
    # Signed zeros everywhere: a base of -0 and +0, models of -0 and +0, so τ = -0 (only from -0 - +0),
    # +0, exact cancellations; cut-offs at 0 (keep all) and at values the task vectors hold exactly.
    g = torch.Generator().manual_seed(3)
    n = 60_000
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
    base[:3000], base[3000:6000] = 0.0, -0.0
    models = []
    for i in range(3):
        m = (base + torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)
        m[: 1500 + 500 * i] = -0.0
        m[3000 : 4000 + 300 * i] = 0.0
        models.append(m)
    models[2][10_000:20_000] = (2 * base[10_000:20_000] - models[1][10_000:20_000].float()).to(torch.bfloat16)
    tv = torch.stack([m.float() - base for m in models])
    if cut_at == "zero":
        cuts = [0.0, 0.0, 0.0]
    elif cut_at == "exact":
        cuts = [float(row.abs()[row != 0][0]) for row in tv]  # a value some entries sit on exactly
    else:
        cuts = [float(row.abs().median()) for row in tv]
    chunk = _merge("ties", base, models, {"scaling_factor": 0.8, "merge_func": "sum"}, stats={"cut": cuts})
    want, trimmed, sign = _fusionbench_ties(base, models, cuts, "sum")
    assert _same_bits(chunk.values, want)
    assert torch.equal(chunk.positions, ((sign == 0) & (trimmed != 0).any(0)).nonzero().flatten())
    for majority, values in ((-1.0, chunk.alternatives[0]), (0.0, chunk.alternatives[1])):
        under = base + 0.8 * _disjoint_merge(trimmed, torch.full_like(sign, majority), "sum")
        assert _same_bits(values, under[chunk.positions])
    assert bool((base.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).any())  # -0 was there


def test_source_hashes_are_the_files_sha256(tmp_path: Path) -> None:
    paths = []
    for i, size in enumerate((0, 1, 2**24 + 3)):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    hashes = SourceHashes(paths).result()
    assert hashes == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_cancel_stops_hashing_before_the_next_file(tmp_path: Path) -> None:
    fifo, big = tmp_path / "fifo", tmp_path / "big"
    os.mkfifo(fifo)
    big.write_bytes(b"x" * 1000)
    hashes = SourceHashes([fifo, big])  # blocks reading the fifo until we write and close it
    with open(fifo, "wb") as writer:
        writer.write(b"first bytes")
        writer.flush()
        stopper = threading.Thread(target=hashes.cancel)
        stopper.start()
        hashes._stop.wait()  # cancel() has asked; the thread is still inside the fifo
    stopper.join()  # the fifo reached EOF: the thread saw the request and ended
    assert big not in hashes.result()
