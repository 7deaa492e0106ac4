"""The engine: execute a `MergePlan`, streaming tensor slices from the inputs into the output shards.

Memory stays a small multiple of one slice (`plan.CHUNK_ELEMENTS` per input) whatever the model size:
every method is elementwise once TIES's per-model magnitude cut-offs are known, and those come from a
two-pass streaming selection (`selection.py`). Arithmetic runs in float32 (float64 inputs stay float64)
on the chosen device and is rounded once to the output dtype.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from . import __version__
from .checkpoint import ShardWriter, TensorReader
from .diagnostics import MergeStats
from .methods import TiesChunk, linear, simple_average, task_arithmetic, ties, ties_keep_count
from .plan import MergePlan, OutputTensor
from .selection import kth_smallest

__all__ = ["Progress", "collect_stats", "write_weights"]

Progress = Callable[[int], None]  # called with the number of output bytes just written


class _Patches:
    """TIES positions whose value depends on the global majority sign (see `methods.TiesChunk`).

    With quantised (bf16) task vectors, exact cancellations can number in the millions, so they are
    spilled to a scratch file as they appear instead of being held in memory: RAM stays one slice.
    """

    _HEADER = struct.Struct("<iq")  # output tensor index, number of positions

    def __init__(self, scratch: Path, dtype: torch.dtype) -> None:
        self.path = scratch
        self.dtype = dtype
        self.sign_sum = 0
        self.count = 0
        self._file = open(scratch, "wb")  # noqa: SIM115 - closed in close()

    def add(self, index: int, tensor: OutputTensor, first_row: int, chunk: TiesChunk) -> None:
        self.sign_sum += chunk.sign_sum
        n = chunk.undecided.numel()
        if not n:
            return
        offset = first_row * (tensor.numel // tensor.shape[0] if tensor.shape and tensor.shape[0] else 1)
        self._file.write(self._HEADER.pack(index, n))
        for data in (
            (chunk.undecided + offset).cpu(),
            chunk.if_negative.to(self.dtype),
            chunk.if_zero.to(self.dtype),
        ):
            self._file.write(data.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.count += n

    def apply(self, plan: MergePlan, files: Mapping[str, ShardWriter]) -> set[str]:
        """Rewrite the positions written under a +1 majority that turned out -1 (or 0); return the files."""
        self._file.close()
        if not self.count or self.sign_sum > 0:
            return set()
        where = {name: (w.path, w.data_start + w.offsets[name]) for w in files.values() for name in w.offsets}
        item = torch.empty(0, dtype=self.dtype).element_size()
        touched = set()
        with open(self.path, "rb") as spill:
            while header := spill.read(self._HEADER.size):
                index, n = self._HEADER.unpack(header)
                positions = torch.frombuffer(bytearray(spill.read(8 * n)), dtype=torch.int64)
                if_negative, if_zero = (
                    torch.frombuffer(bytearray(spill.read(item * n)), dtype=self.dtype) for _ in range(2)
                )
                path, start = where[plan.tensors[index].name]
                touched.add(path.name)
                first, last = int(positions[0]), int(positions[-1])  # ascending within one slice
                with open(path, "r+b") as out:
                    out.seek(start + first * item)
                    span = torch.frombuffer(bytearray(out.read((last - first + 1) * item)), dtype=self.dtype)
                    span[positions - first] = if_negative if self.sign_sum < 0 else if_zero
                    out.seek(start + first * item)
                    out.write(span.view(torch.uint8).numpy().tobytes())
        return touched

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class _Inputs:
    """Reads the math inputs' slices of output tensors and upcasts them on the compute device.

    The next slice is read on a second thread while the current one is computed: `pread` releases the
    GIL, so reading (a copy out of the page cache, or the disk) overlaps the arithmetic.
    """

    def __init__(
        self, plan: MergePlan, folders: Sequence[Path], device: torch.device, stats_base: Path | None = None
    ) -> None:
        self.readers = [TensorReader(folder) for folder in folders]
        # The base, read after the math inputs only for the diagnostics (`OutputTensor.stats_base`).
        self.stats_base = TensorReader(stats_base) if stats_base is not None else None
        self.dtype = plan.compute_dtype
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-read")

    def _read(self, tensor: OutputTensor, start: int) -> list[torch.Tensor]:
        span = (start, min(tensor.shape[0], start + tensor.chunk_rows)) if tensor.shape else None
        slices = [reader.read(info, span) for reader, info in zip(self.readers, tensor.inputs, strict=True)]
        if self.stats_base is not None and tensor.stats_base is not None:
            slices.append(self.stats_base.read(tensor.stats_base, span))
        return slices

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
            yield tensor, start, [r.to(self.device, non_blocking=True).to(self.dtype) for r in raw]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for reader in self.readers:
            reader.close()
        if self.stats_base is not None:
            self.stats_base.close()


def _open_inputs(
    plan: MergePlan, folders: Mapping[int, Path], device: torch.device, stats: MergeStats | None
) -> _Inputs:
    reads_base = stats is not None and plan.base is not None and any(t.stats_base for t in plan.tensors)
    base = folders[id(plan.base)] if reads_base and plan.base is not None else None
    return _Inputs(plan, [folders[id(s)] for s in plan.inputs], device, base)


def _magnitudes(inputs: _Inputs, tensors: Sequence[OutputTensor]) -> Callable[[], Iterator[torch.Tensor]]:
    def chunks() -> Iterator[torch.Tensor]:
        for _, _, (base, *models) in inputs.stream(tensors):
            yield torch.stack([(m - base).abs_().flatten() for m in models]).to("cpu", torch.float32)

    return chunks


def _ties_thresholds(plan: MergePlan, inputs: _Inputs) -> dict[str, list[float]]:
    """Per output tensor, each model's magnitude cut-off: over the whole model, or per tensor."""
    threshold = float(plan.recipe.parameters["threshold"])
    n = len(plan.models)
    if plan.recipe.parameters["trim"] == "global":
        # d counts every merged parameter once: a tied embedding is one tensor here, not two.
        rank = ties_keep_count(plan.parameter_count, threshold)
        cut = kth_smallest(_magnitudes(inputs, plan.tensors), [rank] * n)
        return {t.name: cut for t in plan.tensors}
    return {
        t.name: kth_smallest(_magnitudes(inputs, [t]), [ties_keep_count(t.numel, threshold)] * n)
        for t in plan.tensors
    }


def _merge_slice(
    plan: MergePlan, slices: list[torch.Tensor], thresholds: list[float] | None
) -> torch.Tensor | TiesChunk:
    params = plan.recipe.parameters
    method = plan.recipe.method.name
    weights = [float(m.ref.params.get("weight", 1.0)) for m in plan.models]
    if method == "simple_average":
        return simple_average(slices)
    if method == "linear":
        return linear(slices, weights)
    base, *models = slices
    if method == "task_arithmetic":
        return task_arithmetic(base, models, weights, float(params["scaling_factor"]))
    assert thresholds is not None
    return ties(base, models, thresholds, float(params["scaling_factor"]), str(params["merge_func"]))


def collect_stats(plan: MergePlan, folders: Mapping[int, Path], device: torch.device) -> MergeStats:
    """The diagnostics of the merge `plan` describes, from the same reads as `write_weights`, writing nothing."""
    stats = MergeStats(plan)
    inputs = _open_inputs(plan, folders, device, stats)
    try:
        thresholds = _ties_thresholds(plan, inputs) if plan.recipe.method.trims else {}
        for tensor, _, slices in inputs.stream(plan.tensors):
            stats.add(tensor, slices, thresholds.get(tensor.name))
    finally:
        inputs.close()
    return stats


def write_weights(
    plan: MergePlan,
    folders: Mapping[int, Path],
    directory: Path,
    device: torch.device,
    progress: Progress,
    stats: MergeStats | None = None,
) -> dict[str, str | None]:
    """Write the merged safetensors shards (and index) into `directory`, feeding `stats` every slice read.

    Returns each written file name with the sha256 of its bytes where it is already known.
    """
    inputs = _open_inputs(plan, folders, device, stats)
    patches = _Patches(directory / ".ties-undecided.tmp", plan.out_dtype)
    index = {t.name: i for i, t in enumerate(plan.tensors)}
    files: dict[str, ShardWriter] = {}
    try:
        thresholds = _ties_thresholds(plan, inputs) if plan.recipe.method.trims else {}
        by_name = {t.name: t for t in plan.tensors}
        for layout in plan.shards:
            writer = ShardWriter(directory / layout.file, layout, {"format": "pt"})
            files[layout.file] = writer
            try:
                for tensor, start, slices in inputs.stream([by_name[name] for name, _ in layout.tensors]):
                    if stats is not None:
                        stats.add(tensor, slices, thresholds.get(tensor.name))
                    result = _merge_slice(plan, slices[: len(plan.inputs)], thresholds.get(tensor.name))
                    if isinstance(result, TiesChunk):
                        patches.add(index[tensor.name], tensor, start, result)
                        result = result.values
                    out = result.to(plan.out_dtype).cpu()
                    writer.write(out)
                    progress(out.numel() * out.element_size())
            finally:
                writer.close()
        written: dict[str, str | None] = {file: w.digest.hexdigest() for file, w in files.items()}
        written |= dict.fromkeys(patches.apply(plan, files))  # rewritten: hash them again
    finally:
        inputs.close()
        patches.close()
    if len(plan.shards) > 1:
        _write_index(plan, directory)
        written["model.safetensors.index.json"] = None
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
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
