"""The engine: execute a `MergePlan`, streaming tensor slices from the inputs into the output shards.

Memory stays a small multiple of one slice (`plan.CHUNK_ELEMENTS` per input) whatever the model size.
The engine runs every method the same way (`methods.base`): the method's model-scope passes over the
whole model first, then per output tensor its tensor-scope passes and the merge step, slice by slice. A
`Reduce` pass folds slices into a small accumulator; a `Select` pass finds exact k-th smallest values
with the streaming selection (`selection.py`): a sample brackets each cut-off, one pass counts exactly
against the bracket (two more only where a bracket missed). When the plan says so, the method's `settle`
pass runs last before the merge, over the whole model, so that no closed shard is rewritten afterwards.
Arithmetic runs in float32 (float64 inputs stay float64) on the chosen device and is rounded once to the
output dtype.

Reading, computing and writing overlap: a read thread fetches the next slice while the current one is
computed, a slice is computed in small pieces (`_PIECE_ELEMENTS`) on up to two merge threads, and a write
thread writes and hashes each finished piece, in order. The merge diagnostics of a piece are measured on
the thread that merges it, just before (`diagnostics.MergeStats.measure`), and recorded in order.
"""

from __future__ import annotations

import math
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from .. import __version__
from ..errors import HubmergeError, SourceError
from ..publish.files import INDEX_FILE, SCRATCH_FILE
from ..quality.diagnostics import Measured, MergeStats
from ..sources.checkpoint import Folder, ShardWriter, TensorInfo, TensorReader
from .methods import Deferral, Deferred, Reduce, Select, Slice
from .methods.base import Pass
from .plan import MergePlan, OutputTensor
from .selection import bracket, kth_smallest

__all__ = ["Progress", "collect_stats", "write_weights"]

Progress = Callable[[int], None]  # called with the number of output bytes just written
# One piece as the engine streams it: its tensor, its first row, one slice per input, the tensor's stats.
_Piece = tuple[OutputTensor, int, list[torch.Tensor], dict[str, Any]]


class _Patches:
    """The positions a method left open (`methods.Deferred`), settled after the last shard (`Deferral`).

    They can number in the millions (exact cancellations of quantised task vectors), so they are
    spilled to a scratch file as they appear instead of being held in memory: RAM stays one slice.
    """

    _HEADER = struct.Struct("<iq")  # output tensor index, number of positions

    def __init__(self, scratch: Path, dtype: torch.dtype, deferral: Deferral) -> None:
        self.path = scratch
        self.dtype = dtype
        self.deferral = deferral
        self.tally: Any = None
        self.count = 0
        self.alternatives = 0
        self._file = open(scratch, "wb")  # noqa: SIM115 - closed in close()

    def add(self, index: int, tensor: OutputTensor, first_row: int, deferred: Deferred) -> None:
        self.tally = deferred.tally if self.tally is None else self.tally + deferred.tally
        n = deferred.positions.numel()
        if not n:
            return
        self.alternatives = len(deferred.alternatives)
        offset = first_row * (tensor.numel // tensor.shape[0] if tensor.shape and tensor.shape[0] else 1)
        self._file.write(self._HEADER.pack(index, n))
        for data in ((deferred.positions + offset).cpu(), *(a.to(self.dtype) for a in deferred.alternatives)):
            self._file.write(data.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.count += n

    def apply(self, plan: MergePlan, files: Mapping[str, ShardWriter]) -> set[str]:
        """Rewrite the open positions with the alternative the method decides on; return the files."""
        self._file.close()
        choice = self.deferral.decide(self.tally) if self.count else None
        if choice is None:
            return set()
        where = {name: (w.path, w.data_start + w.offsets[name]) for w in files.values() for name in w.offsets}
        item = torch.empty(0, dtype=self.dtype).element_size()
        touched = set()
        with open(self.path, "rb") as spill:
            while header := spill.read(self._HEADER.size):
                index, n = self._HEADER.unpack(header)
                positions = torch.frombuffer(bytearray(spill.read(8 * n)), dtype=torch.int64)
                alternatives = [
                    torch.frombuffer(bytearray(spill.read(item * n)), dtype=self.dtype)
                    for _ in range(self.alternatives)
                ]
                path, start = where[plan.tensors[index].name]
                touched.add(path.name)
                first, last = int(positions[0]), int(positions[-1])  # ascending within one slice
                with open(path, "r+b") as out:
                    out.seek(start + first * item)
                    span = torch.frombuffer(bytearray(out.read((last - first + 1) * item)), dtype=self.dtype)
                    span[positions - first] = alternatives[choice]
                    out.seek(start + first * item)
                    out.write(span.view(torch.uint8).numpy().tobytes())
        return touched

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


# Elements per input that a method computes on at a time: with every operation a pass over memory, a
# piece that stays in the CPU's caches made TIES 2.3× and the linear methods 3-4× faster than a whole 4 Mi
# slice (bench/RESULTS.md). Results do not depend on it: every method gives the same bits whatever its
# slices (tests/test_slices.py).
_PIECE_ELEMENTS = 1 << 18


class _Inputs:
    """Reads the math inputs' slices of output tensors and upcasts them on the compute device.

    The next slice is read on a second thread while the current one is computed: `pread` releases the
    GIL, so reading (a copy out of the page cache, or the disk) overlaps the arithmetic.
    """

    def __init__(
        self,
        plan: MergePlan,
        folders: Mapping[str, Folder],
        device: torch.device,
        stats_base: Folder | None = None,
    ) -> None:
        # A source listed twice is one reader, and each of its slices is read once (`rows`).
        readers = {s.key: TensorReader(folders[s.key]) for s in plan.inputs}
        self.readers = [readers[s.key] for s in plan.inputs]
        self.keys = [s.key for s in plan.inputs]
        self.labels = [s.label for s in plan.inputs]
        self.allow_non_finite = plan.recipe.allow_non_finite
        # The slices whose values were proven finite: a method that reads the sources twice or three times
        # (a selection pass, a settle pass, then the merge) reads the same bytes, and checks them once.
        self._finite: set[tuple[str, str, tuple[int, int] | None]] = set()
        # The base, read after the math inputs only for the diagnostics (`OutputTensor.stats_base`).
        self.stats_base = TensorReader(stats_base) if stats_base is not None else None
        self.dtype = plan.compute_dtype
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-read")

    def _read(self, tensor: OutputTensor, start: int) -> list[torch.Tensor]:
        return self.rows(tensor, start, start + tensor.chunk_rows)

    def rows(self, tensor: OutputTensor, start: int, stop: int) -> list[torch.Tensor]:
        """Rows [start, stop) of `tensor` (all of a 0-d tensor) from every input, in their stored dtype,
        then the diagnostics' base when it is read for them.

        A source named twice in the recipe is read once: both mentions share the slice.
        """
        span = (start, min(tensor.shape[0], stop)) if tensor.shape else None
        read: dict[tuple[str, TensorInfo], torch.Tensor] = {}
        slices = []
        for reader, source, info, label in zip(
            self.readers, self.keys, tensor.inputs, self.labels, strict=True
        ):
            key = (source, info)
            if key not in read:
                read[key] = reader.read(info, span)
                # A NaN or Inf in a source would spread through the merge unnoticed; refuse it by name.
                if not self.allow_non_finite and (source, info.name, span) not in self._finite:
                    if not _finite(read[key]):
                        raise SourceError(
                            f"{label}: tensor {info.name} holds NaN or Inf values; fix or replace the source, "
                            "or set allow_non_finite = true in the recipe to merge it anyway"
                        )
                    self._finite.add((source, info.name, span))
            slices.append(read[key])
        if self.stats_base is not None and tensor.stats_base is not None:
            slices.append(self.stats_base.read(tensor.stats_base, span))
        return slices

    def upcast(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """The slices on the compute device; the first one (base, or the first model) in the compute dtype.

        The others keep their stored dtype: the methods pair each with a compute-dtype tensor, so type
        promotion does the exact upcast inside the arithmetic instead of in a copy (see `methods`).
        """
        first, *rest = (r.to(self.device, non_blocking=True) for r in raw)
        return [first.to(self.dtype), *rest]

    def stream(
        self, tensors: Sequence[OutputTensor]
    ) -> Iterator[tuple[OutputTensor, int, list[torch.Tensor]]]:
        """(tensor, first row, one slice per input) for every slice of `tensors`, in order."""
        order = [
            (t, start) for t in tensors for start in range(0, t.shape[0] if t.shape else 1, t.chunk_rows)
        ]
        pending: Future[list[torch.Tensor]] | None = None
        for i, (tensor, start) in enumerate(order):
            raw = pending.result() if pending is not None else self._read(tensor, start)
            pending = self.pool.submit(self._read, *order[i + 1]) if i + 1 < len(order) else None
            # Read in slices, computed in pieces: a slice is large so that reads are few (HTTP ranges for
            # streamed sources), a piece small so that a method's every operation works in the CPU's cache.
            # On an accelerator the whole slice is one piece: there a small operation costs its launch.
            rows = raw[0].shape[0] if raw[0].dim() else 1
            step = max(1, _PIECE_ELEMENTS // max(raw[0][:1].numel(), 1)) if raw[0].dim() else 1
            if self.device.type != "cpu":
                step = rows
            for first in range(0, rows, step):
                piece = raw if step >= rows else [r[first : first + step] for r in raw]
                yield tensor, start + first, self.upcast(piece)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for reader in self.readers:
            reader.close()
        if self.stats_base is not None:
            self.stats_base.close()


def _open_inputs(
    plan: MergePlan, folders: Mapping[str, Folder], device: torch.device, stats: MergeStats | None
) -> _Inputs:
    # The base is read for the diagnostics only when they are collected and the method's math skips it.
    reads_base = stats is not None and any(t.stats_base for t in plan.tensors)
    return _Inputs(plan, folders, device, folders[plan.base.key] if reads_base and plan.base else None)


def _slice(plan: MergePlan, tensor: OutputTensor, start: int, slices: Sequence[torch.Tensor]) -> Slice:
    """One slice as a method sees it: the base apart (when the method reads one), parameters resolved."""
    n = len(plan.models)
    math_inputs = slices[: len(plan.inputs)]
    base = math_inputs[0] if len(math_inputs) > n else None
    return Slice(
        name=tensor.name,
        shape=tensor.shape,
        start=start,
        base=base,
        models=tuple(math_inputs[-n:]),
        params=tensor.params,
        model_params=tensor.model_params,
    )


_SAMPLE = 1 << 21  # values per series in the sample that brackets a cut-off (8 MiB of float32)
_SAMPLE_BLOCKS = 8  # row blocks per tensor, spread over it, so no one region of a tensor speaks for all


class _Passes:
    """Runs a method's statistics passes (`methods.base`) over the streamed inputs."""

    def __init__(self, plan: MergePlan, inputs: _Inputs, workers: _Workers | None = None) -> None:
        self.plan = plan
        self.inputs = inputs
        self.workers = workers
        method = plan.recipe.method
        self.settle = method.settle if plan.disk.settle_first else None
        self.model_passes = tuple(p for p in plan.passes if p.scope == "model" and p is not self.settle)
        self.tensor_passes = tuple(p for p in plan.passes if p.scope == "tensor")
        self.model_stats: dict[str, Any] = {}
        # A settle pass needs each tensor's own results once before the merge and once in it: they are
        # kept (a few numbers per tensor) rather than computed, and read, twice.
        self._kept: dict[str, dict[str, Any]] | None = {} if self.settle is not None else None

    def before_merge(self) -> None:
        for p in self.model_passes:
            self.model_stats[p.name] = self._run(p, self.plan.tensors, self.model_stats)
        if self.settle is not None:
            accumulator = None
            for tensor, start, slices, stats in self.with_stats(self.plan.tensors):
                accumulator = self.settle.step(_slice(self.plan, tensor, start, slices), stats, accumulator)
            self.model_stats[self.settle.name] = accumulator

    def for_tensor(self, tensor: OutputTensor) -> dict[str, Any]:
        if self._kept is not None and tensor.name in self._kept:
            return {**self.model_stats, **self._kept[tensor.name]}
        stats = dict(self.model_stats)
        own = {}
        for p in self.tensor_passes:
            if isinstance(p, Reduce) and p.shapes is not None and not p.shapes(tensor.shape):
                continue
            stats[p.name] = own[p.name] = self._run(p, (tensor,), stats)
        if self._kept is not None:
            self._kept[tensor.name] = own
        return stats

    def with_stats(
        self, tensors: Sequence[OutputTensor]
    ) -> Iterator[tuple[OutputTensor, int, list[torch.Tensor], dict[str, Any]]]:
        """Every slice of `tensors`, each with its tensor's statistics (its passes run first).

        Without tensor-scope passes every tensor has the model-scope results, and the slices of consecutive
        tensors stream with read-ahead across tensors.
        """
        if not self.tensor_passes:
            shared = self.for_tensor(tensors[0]) if tensors else {}
            for tensor, start, slices in self.inputs.stream(tensors):
                yield tensor, start, slices, shared
            return
        for tensor in tensors:
            current = self.for_tensor(tensor)
            for _, start, slices in self.inputs.stream([tensor]):
                yield tensor, start, slices, current

    def _slices(self, tensors: Sequence[OutputTensor]) -> Iterator[Slice]:
        for tensor, start, slices in self.inputs.stream(tensors):
            yield _slice(self.plan, tensor, start, slices)

    def _run(self, p: Pass, tensors: Sequence[OutputTensor], stats: Mapping[str, Any]) -> Any:
        if isinstance(p, Reduce):
            accumulator = None
            for s in self._slices(tensors):
                accumulator = p.step(s, stats, accumulator)
            return accumulator
        total = sum(t.numel for t in tensors)
        first = self._sample_slice(tensors[0], 0, 1)
        ranks = p.ranks(total, first, stats) if p.ranks_use_stats else p.ranks(total, first)
        if not any(r >= 1 for r in ranks):
            return [0.0] * len(ranks)

        def chunks() -> Iterator[torch.Tensor]:
            return _ordered(self.workers, lambda s: p.quantity(s, stats), self._slices(tensors))

        brackets = bracket(self._sample(p, tensors, total, stats), ranks, total)
        return kth_smallest(chunks, ranks, brackets)

    def _sample_slice(self, tensor: OutputTensor, start: int, stop: int) -> Slice:
        return _slice(self.plan, tensor, start, self.inputs.upcast(self.inputs.rows(tensor, start, stop)))

    def _sample(
        self, p: Select, tensors: Sequence[OutputTensor], total: int, stats: Mapping[str, Any]
    ) -> torch.Tensor:
        """The quantity on about `_SAMPLE` elements, a share of every tensor in proportion to its size."""
        fraction = min(1.0, _SAMPLE / max(total, 1))
        parts = []
        for tensor in tensors:
            rows = tensor.shape[0] if tensor.shape else 1
            take = max(1, round(rows * fraction))
            # A tensor sampled whole is one read per source (one request for a streamed one), not blocks.
            blocks = 1 if take >= rows else min(_SAMPLE_BLOCKS, take)
            length = -(-take // blocks)
            for j in range(blocks):
                start = j * rows // blocks
                parts.append(p.quantity(self._sample_slice(tensor, start, start + length), stats))
        return torch.cat(parts, dim=1)


def _cuts(plan: MergePlan, stats: Mapping[str, Any]) -> Any:
    """The per-model magnitude cut-offs the diagnostics need, for a method that trims (`Method.cuts`)."""
    cuts = plan.recipe.method.cuts
    return stats.get(cuts) if cuts is not None else None


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN and no ±Inf. min and max carry both (NaN propagates), and `aminmax` is one pass that is
    several times cheaper than `isfinite(...).all()` on a CPU slice."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _check_finite(
    plan: MergePlan, tensor: OutputTensor, slices: Sequence[torch.Tensor], out: torch.Tensor
) -> None:
    """A merge never writes a NaN or Inf that no input had (a weight sum of 0, a float16 overflow)."""
    if _finite(out):
        return
    if plan.recipe.allow_non_finite and not all(_finite(s) for s in slices):
        return  # the recipe accepted non-finite inputs, and this slice has some
    raise HubmergeError(
        f"the merged {tensor.name} has NaN or Inf values although its inputs are finite (overflow in "
        f"{str(plan.out_dtype).removeprefix('torch.')}, or parameters that cancel out); check the method's "
        'parameters or set dtype = "float32"'
    )


def _arithmetic_threads(default: int) -> int:
    """Intra-op threads for the arithmetic: one core fewer than the process may use, at least one.

    The read, write and hash threads need a core of their own; sharing it with OpenMP workers, which
    spin while they wait for the next operation, cost 3× the CPU time on 2 cores (bench/RESULTS.md).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(default, cores - 1))


T = TypeVar("T")
R = TypeVar("R")


def _merge_threads(device: torch.device) -> int:
    """Threads that compute pieces side by side: two on a CPU whose arithmetic runs on one thread (two
    cores), where a piece's small operations leave the second core idle between them (torch releases the
    GIL inside each); 0.5B TIES on 2 cores: 16-19 s with one, 12.6-14.5 s with two. One where torch already
    spreads each operation over several cores (two callers would each start a team of spinning OpenMP
    workers), and on an accelerator, which queues the operations anyway."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if device.type == "cpu" and cores >= 2 and torch.get_num_threads() == 1 else 1


class _Workers:
    """The merge threads. Each piece is computed alone, by the same operations whichever thread runs it,
    so results do not depend on their number (tests/test_slices.py)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="hubmerge-merge")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _ordered(workers: _Workers | None, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """fn over items on the workers, results in the items' order, at most `workers.count` in flight."""
    if workers is None or workers.count == 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            if len(pending) == workers.count:
                yield pending.popleft().result()
            pending.append(workers.pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:  # stopped early (an error): the rest is not wanted
            future.cancel()


@contextmanager
def _merge_workers(device: torch.device) -> Iterator[_Workers]:
    """The merge threads, with torch's own arithmetic threads set for them while they run."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(_arithmetic_threads(threads))
    workers = _Workers(_merge_threads(device))
    try:
        yield workers
    finally:
        workers.close()
        torch.set_num_threads(threads)


def collect_stats(plan: MergePlan, folders: Mapping[str, Folder], device: torch.device) -> MergeStats:
    """The diagnostics of the merge `plan` describes, from the same reads and pieces as `write_weights` and
    measured the same way (so the numbers are the merge's, to the bit), writing nothing."""
    stats = MergeStats(plan)
    inputs = _open_inputs(plan, folders, device, stats)
    try:
        with _merge_workers(device) as workers:
            passes = _Passes(plan, inputs, workers)
            passes.before_merge()

            def measure(piece: _Piece) -> Measured | None:
                tensor, _, slices, current = piece
                return stats.measure(tensor, slices, _cuts(plan, current))

            for measured in _ordered(workers, measure, passes.with_stats(plan.tensors)):
                if measured is not None:
                    stats.record(measured)
    finally:
        inputs.close()
    return stats


def write_weights(
    plan: MergePlan,
    folders: Mapping[str, Folder],
    directory: Path,
    device: torch.device,
    progress: Progress,
    stats: MergeStats | None = None,
    on_shard: Callable[[Path], None] | None = None,
) -> dict[str, str | None]:
    """Write the merged safetensors shards (and index) into `directory`; measure the diagnostics of every
    piece into `stats` on the way (`MergeStats.measure`, on the merge threads beside the piece's merge).

    `on_shard` is called with each shard's path once it is complete (a method that leaves positions open,
    `methods.Deferred`, may rewrite some after the last one: those come back in the result without a
    hash; `MergePlan.rewrites_shards`). Returns each written file name with the sha256 of its bytes where
    it is already known.
    """
    method = plan.recipe.method
    inputs = _open_inputs(plan, folders, device, stats)
    # A scratch file only where the method may leave positions open: not when its settle pass runs first.
    patches = (
        _Patches(directory / SCRATCH_FILE, plan.out_dtype, method.deferral)
        if plan.rewrites_shards and method.deferral is not None
        else None
    )
    index = {t.name: i for i, t in enumerate(plan.tensors)}
    files: dict[str, ShardWriter] = {}
    try:
        with _merge_workers(device) as workers:
            passes = _Passes(plan, inputs, workers)
            passes.before_merge()
            by_name = {t.name: t for t in plan.tensors}

            def compute(
                piece: _Piece,
            ) -> tuple[OutputTensor, int, torch.Tensor, Deferred | None, Measured | None]:
                tensor, start, slices, current = piece
                # The diagnostics of the piece first, on the same thread while its inputs are in cache; they
                # read the slices and change nothing, so the merge sees the same inputs as without them.
                measured = None
                if stats is not None:
                    measured = stats.measure(tensor, slices, _cuts(plan, current))
                result = method.merge(_slice(plan, tensor, start, slices), current)
                deferred = result if isinstance(result, Deferred) else None
                out = (deferred.values if deferred is not None else result).to(plan.out_dtype).cpu()
                _check_finite(plan, tensor, slices, out)
                return tensor, start, out, deferred, measured

            for layout in plan.shards:
                writer = ShardWriter(directory / layout.file, layout, {"format": "pt"})
                files[layout.file] = writer
                try:
                    shard = [by_name[name] for name, _ in layout.tensors]
                    for tensor, start, out, deferred, measured in _ordered(
                        workers, compute, passes.with_stats(shard)
                    ):
                        if stats is not None and measured is not None:
                            stats.record(measured)  # in the pieces' order: the same sums as `collect_stats`
                        if deferred is not None:
                            assert patches is not None, (
                                f"{method.name} left positions open without a deferral"
                            )
                            patches.add(index[tensor.name], tensor, start, deferred)
                        writer.write(out)
                        progress(out.numel() * out.element_size())
                except BaseException:
                    writer.close(complete=False)  # the error that stopped the shard is the one to report
                    raise
                writer.close()
                if on_shard is not None:
                    on_shard(writer.path)
            written: dict[str, str | None] = {file: w.digest.hexdigest() for file, w in files.items()}
            if patches is not None:
                written |= dict.fromkeys(patches.apply(plan, files))  # rewritten: hash them again
    finally:
        inputs.close()
        if patches is not None:
            patches.close()
    if len(plan.shards) > 1:
        _write_index(plan, directory)
        written[INDEX_FILE] = None
    return written


def _write_index(plan: MergePlan, directory: Path) -> None:
    import json

    weight_map = {name: layout.file for layout in plan.shards for name, _ in layout.tensors}
    index = {
        "metadata": {
            "total_size": plan.output_bytes,
            "total_parameters": plan.parameter_count,
            "hubmerge_version": __version__,
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
