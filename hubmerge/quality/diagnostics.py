"""Merge diagnostics: what the task vectors look like, measured while the engine streams the inputs anyway.

`MergeStats` is an accumulator of a few float64 sums and integer counts per tensor, so its memory does not
grow with the model. The engine measures every piece it merges (`MergeStats.measure`) on the merge thread
that merges it, just before the merge step, while the piece's inputs are in the CPU's caches, and records
the results in the pieces' order (`MergeStats.record`): no extra pass over the inputs, and the same
numbers, to the bit, as `hubmerge inspect`, which streams the same pieces without merging. Per tensor, per decoder layer and over the whole model it reports, for task vectors
τᵢ = θᵢ − θ_base:

- norm             ‖τᵢ‖₂
- cosine           τᵢ·τⱼ / (‖τᵢ‖ ‖τⱼ‖) for every pair (null where a norm is 0)
- sign_conflict    share of positions where some τᵢ > 0 and some τⱼ < 0
- model_conflict   per model: share of positions where τᵢ ≠ 0 and another τⱼ has the opposite sign
- kept             for a method that trims (`Method.cuts`), per model: share of positions that survive
                   trimming (|τᵢ| >= its cut-off, τᵢ ≠ 0)
- dropped          for a method that trims, per model: share of positions kept by trimming but dropped by
                   the elected sign; where the elected sign is 0 the model-wide majority decides

The reference is the base for every method: simple_average and linear ignore the base, but the engine
reads it for the diagnostics when the recipe names one (it is downloaded for config.json anyway). Without
a base there are no task vectors, and the statistics are reported as not applicable rather than measured
against a stand-in such as the models' mean (whose deviations always sum to zero, so two models would
always show a cosine of −1).

Not free arithmetic: per piece, the task vectors again, their Gram matrix in float64 (so the numbers do not
depend on the piece size) and the sign counts. On a CPU the compiled kernel (`kernel.measure`,
hubmerge/_kernels.c) takes them all in one pass over the piece's inputs; elsewhere, and where it is not
built, torch does (`_measure_torch`): about a dozen elementwise passes, every count a matrix product of
sign vectors (`_counts`) or numpy's compares. Counts are exact either way; the kernel adds the same exact
float64 products in another order than torch's addmm, so norms and cosines agree to 1e-12 (tests hold
both). bench/RESULTS.md has the end-to-end cost.
`--no-stats` or `[output] stats = false` turns them off.

`write_stats` writes `merge_stats.json` and, when matplotlib is installed (`hubmerge[plots]`), the plots.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..merging.methods import trim_
from ..merging.methods.base import cpu_array, trim_threshold
from ..merging.plan import MergePlan, OutputTensor
from ..publish.files import STATS_FILE, STATS_PLOTS
from . import kernel, plots

__all__ = [
    "PLOTS",
    "STATS_FILE",
    "Measured",
    "MergeStats",
    "model_summary",
    "number_text",
    "stats_files",
    "summary_text",
    "write_stats",
]

PLOTS = STATS_PLOTS  # chart -> (file, title)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_BLOCK = 1 << 20  # elements per model converted to float64 at once for the dot products


@dataclass
class _Sums:
    """One tensor's (or layer's) accumulators: exact counts, float64 sums."""

    numel: int
    gram: torch.Tensor  # (n, n) float64: τᵢ·τⱼ, the squared norms on the diagonal
    conflict: torch.Tensor  # () int64
    model_conflict: torch.Tensor  # (n,) int64
    kept: torch.Tensor  # (n,) int64
    dropped: torch.Tensor  # (n,) int64: where the elected sign is not 0
    undecided_pos: torch.Tensor  # (n,) int64: kept τᵢ > 0 where the elected sign is 0
    undecided_neg: torch.Tensor  # (n,) int64: kept τᵢ < 0 where the elected sign is 0

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> _Sums:
        def count(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        return cls(0, gram, count(), count(n), count(n), count(n), count(n), count(n))

    TENSORS = ("gram", "conflict", "model_conflict", "kept", "dropped", "undecided_pos", "undecided_neg")

    def __iadd__(self, other: _Sums) -> _Sums:
        self.numel += other.numel
        for name in self.TENSORS:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        return self


@dataclass(frozen=True)
class Measured:
    """One piece's share of the diagnostics (`MergeStats.measure`), to be recorded in the pieces' order."""

    name: str  # the output tensor's
    sums: _Sums
    sign_sum: float  # a trimming method's: Σ elected signs over the piece


_NUMPY_COUNTS = True  # tests switch it off to hold both ways of counting to the same numbers
_EXACT = 1 << 24  # a float32 sum of integers is exact while every partial sum stays below 2**24


def _counts(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows @ columns.T, as int64, for entries in {-1, 0, 1}: each product is exact and so is every partial
    sum of a block of at most 2**24 elements, whatever order the matrix product adds them in. One matrix
    product counts what would otherwise be a boolean mask, a logical and and a count per model."""
    total = None
    for a, b in zip(torch.split(rows, _EXACT, dim=1), torch.split(columns, _EXACT, dim=1), strict=True):
        part = (a @ b.T).to(torch.int64)
        total = part if total is None else total + part
    assert total is not None
    return total


class MergeStats:
    """Accumulates the diagnostics of one plan, piece by piece, in any piece size.

    `measure` is a pure function of one piece (it runs on the merge threads, beside the merge of the same
    piece, while its inputs are in cache); `record` adds its result, in the order the pieces come in, so
    the float64 sums do not depend on which thread measured what.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.trims = plan.recipe.method.trims
        self.reference = "base" if plan.base is not None else None
        self._sums: dict[str, _Sums] = {}  # every tensor's, from the first piece recorded
        self._sign_sum = 0.0  # trimming: Σ elected signs over the model, whose sign breaks ties at 0
        # Only a recipe that accepts non-finite inputs can bring a NaN here (the engine refuses them otherwise).
        self._nan = plan.recipe.allow_non_finite
        self._local = threading.local()  # each merge thread's scratch buffers (`_scratch`)

    def add(self, tensor: OutputTensor, slices: Sequence[torch.Tensor], cuts: Sequence[float] | None) -> None:
        """`measure` and `record` in one."""
        measured = self.measure(tensor, slices, cuts)
        if measured is not None:
            self.record(measured)

    def measure(
        self, tensor: OutputTensor, slices: Sequence[torch.Tensor], cuts: Sequence[float] | None
    ) -> Measured | None:
        """One piece's statistics: `slices` as the engine reads them (the plan's math inputs, then
        `tensor.stats_base` when it has one); `cuts` are the per-model magnitude cut-offs of a method that trims (`Method.cuts`). None without
        a base (nothing to measure). Reads the slices, changes nothing; safe to call from several threads."""
        if self.reference is None:
            return None
        if self.plan.recipe.method.uses_base:
            base, models = slices[0], slices[1:]
        else:
            base, models = slices[-1], slices[:-1]
        measured = self._measure_compiled(tensor, base, models, cuts)
        return measured if measured is not None else self._measure_torch(tensor, base, models, cuts)

    def _measure_torch(
        self,
        tensor: OutputTensor,
        base: torch.Tensor,
        models: Sequence[torch.Tensor],
        cuts: Sequence[float] | None,
    ) -> Measured:
        """`measure` by torch's and numpy's elementwise operations: on an accelerator, and on a CPU where
        the compiled kernel is not built or does not take the inputs."""
        # The engine upcasts only the first slice (methods promote the rest inside their arithmetic); the
        # reference must be in the compute dtype too, or bf16 − bf16 would round every task vector.
        base = base.to(self.plan.compute_dtype)
        n, numel, device = len(models), base.numel(), base.device
        task_vectors = self._scratch("task_vectors", (n, numel), base.dtype, device)
        for row, model in zip(task_vectors, models, strict=True):
            torch.sub(model.flatten(), base.flatten(), out=row)
        gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        # float64 a block at a time (a quarter of a slice), so the dot products are exact to rounding.
        for block in torch.split(task_vectors, _BLOCK, dim=1):
            as64 = self._scratch("as64", block.shape, torch.float64, device).copy_(block)
            gram.addmm_(as64, as64.T)
        # Every count below is a matrix product of sign vectors (`_counts`): on a CPU, boolean masks and
        # logical operations cost several times an arithmetic pass (bench/RESULTS.md).
        # A position has a sign conflict when the largest τ is > 0 and the smallest < 0 (conflict = 1.0
        # there, else 0): there, and only there, every nonzero τᵢ is opposed by another model's. (A NaN
        # makes the largest and the smallest NaN, whose sign torch takes as 0: no conflict there.)
        array = cpu_array(task_vectors) if _NUMPY_COUNTS else None
        if array is not None:
            # On a CPU numpy counts the same positions with compares on booleans, 2-3× faster than the
            # arithmetic below (which an accelerator, and a bfloat16 computation, keep).
            conflict_at = array.max(axis=0) > 0  # NaN > 0 is false: no conflict at a NaN, as below
            conflict_at &= array.min(axis=0) < 0
            conflict = torch.tensor(np.count_nonzero(conflict_at))
            model_conflict = torch.tensor([np.count_nonzero((row != 0) & conflict_at) for row in array])
        else:
            high, low = self._scratch("extremes", (2, numel), base.dtype, device)
            torch.amax(task_vectors, dim=0, out=high)
            torch.amin(task_vectors, dim=0, out=low)
            conflict_row = high.sign_().clamp_(min=0).mul_(low.sign_().clamp_(max=0)).neg_()
            rows = self._scratch("rows", (n, numel), base.dtype, device)
            nonzero = torch.sign(task_vectors, out=rows).abs_()  # 1 where τᵢ ≠ 0 (NaN: see above)
            conflict = conflict_row.sum(dtype=torch.float64).to(torch.int64)
            model_conflict = _counts(nonzero, conflict_row[None])[:, 0]
        sums = _Sums(
            numel,
            gram,
            conflict.to(device),
            model_conflict.to(device),
            *(torch.zeros(n, dtype=torch.int64, device=device) for _ in range(4)),
        )
        sign_sum = 0.0
        if self.trims:
            assert cuts is not None
            sign_sum = self._measure_trims(task_vectors, cuts, sums)
        return Measured(tensor.name, sums, sign_sum)

    def _measure_compiled(
        self,
        tensor: OutputTensor,
        base: torch.Tensor,
        models: Sequence[torch.Tensor],
        cuts: Sequence[float] | None,
    ) -> Measured | None:
        """`measure` by the compiled kernel in one pass over the inputs (`kernel.measure`): the same numbers,
        the Gram matrix to float64 rounding. None where the kernel does not apply (then torch measures)."""
        if self.plan.compute_dtype != torch.float32:
            return None
        shrink = None
        if self.trims:
            assert cuts is not None
            shrink = [trim_threshold(cut, torch.float32) for cut in cuts]
        counts = kernel.measure(base, models, shrink)
        if counts is None:
            return None
        kept = counts.kept + counts.nan if self._nan else counts.kept
        sums = _Sums(
            base.numel(),
            counts.gram,
            torch.tensor(counts.conflict),
            counts.model_conflict,
            kept,
            counts.dropped,
            counts.undecided_pos,
            counts.undecided_neg,
        )
        return Measured(tensor.name, sums, float(counts.sign_sum) if self.trims else 0.0)

    def _measure_trims(self, task_vectors: torch.Tensor, cuts: Sequence[float], sums: _Sums) -> float:
        """Fill the trimming counts of `sums` (trimming `task_vectors` in place); return Σ elected signs."""
        n, numel = task_vectors.shape
        for row, cut in zip(task_vectors, cuts, strict=True):
            trim_(row, cut)  # the trimming rule of the methods that trim
        array = cpu_array(task_vectors) if _NUMPY_COUNTS else None
        if array is not None:
            return self._count_trims(task_vectors, array, sums)
        # Columns: the elected sign e, |e| (1 where e ≠ 0), 1 − |e| (1 where e = 0), 1. torch's sign of NaN
        # is 0: where the sum is NaN, no sign is elected.
        columns = self._scratch("columns", (4, numel), task_vectors.dtype, task_vectors.device)
        elected, decided, undecided, ones = columns
        torch.sum(task_vectors, dim=0, out=elected)
        elected.sign_()
        sign_sum = float(elected.sum(dtype=torch.float64))
        torch.abs(elected, out=decided)
        torch.sub(1.0, decided, out=undecided)
        ones.fill_(1.0)
        # Rows: sign τᵢ (±1, or 0 where trimmed away; 0 for NaN too), then |sign τᵢ|.
        rows = self._scratch("rows", (2 * n, numel), task_vectors.dtype, task_vectors.device)
        torch.sign(task_vectors, out=rows[:n])
        torch.abs(rows[:n], out=rows[n:])
        c = _counts(rows, columns)
        signed, unsigned = c[:n], c[n:]
        sums.kept = unsigned[:, 3]
        if self._nan:  # a NaN τᵢ is kept (it is not below the cut-off) and not 0, but has no sign
            sums.kept = sums.kept + torch.isnan(task_vectors).sum(dim=1)
        sums.dropped = (unsigned[:, 1] - signed[:, 0]) // 2  # kept, where e ≠ 0, and of the other sign
        sums.undecided_pos = (unsigned[:, 2] + signed[:, 2]) // 2
        sums.undecided_neg = (unsigned[:, 2] - signed[:, 2]) // 2
        return sign_sum

    def _count_trims(self, task_vectors: torch.Tensor, array: np.ndarray, sums: _Sums) -> float:
        """`_measure_trims`'s counts by numpy's compares on the CPU: the same numbers (a NaN has no sign in
        both), in a third of the time."""
        elected = torch.sum(task_vectors, dim=0).numpy()  # the same sum as the arithmetic path's
        positive, negative = elected > 0, elected < 0
        undecided = ~(positive | negative)  # the elected sign is 0 (or the sum is NaN)
        counts = []
        for row in array:
            above, below = row > 0, row < 0
            counts.append(
                (
                    np.count_nonzero(above) + np.count_nonzero(below),  # kept
                    np.count_nonzero(above & negative) + np.count_nonzero(below & positive),  # dropped
                    np.count_nonzero(above & undecided),
                    np.count_nonzero(below & undecided),
                )
            )
        kept, dropped, undecided_pos, undecided_neg = torch.tensor(counts, dtype=torch.int64).T
        sums.kept = kept
        if self._nan:  # a NaN τᵢ is kept (it is not below the cut-off) and not 0, but has no sign
            sums.kept = sums.kept + torch.isnan(task_vectors).sum(dim=1)
        sums.dropped, sums.undecided_pos, sums.undecided_neg = dropped, undecided_pos, undecided_neg
        return float(np.count_nonzero(positive) - np.count_nonzero(negative))

    def _scratch(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A buffer of this thread's, reused piece after piece: a fresh allocation of a few MB is mapped
        and faulted in every time."""
        size = math.prod(shape)
        buffer: torch.Tensor | None = getattr(self._local, name, None)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(size, dtype=dtype, device=device)
            setattr(self._local, name, buffer)
        return buffer[:size].view(tuple(shape))

    def record(self, measured: Measured) -> None:
        """Add one piece's statistics to its tensor's."""
        self._sign_sum += measured.sign_sum
        if not self._sums:
            # Every tensor's accumulators at once, before the merge's large buffers come and go: small
            # blocks kept until the end and allocated among those buffers kept glibc's heap from shrinking,
            # and a 0.5B merge's peak memory grew by ~0.15 GB (bench/RESULTS.md).
            n, device = len(self.plan.models), measured.sums.gram.device
            self._sums = {t.name: _Sums.zeros(n, device) for t in self.plan.tensors}
        sums = self._sums[measured.name]
        if sums.numel == 0:  # the tensor's first piece: its numbers as they are (not 0.0 + x: -0.0 stays)
            sums.numel = measured.sums.numel
            for name in _Sums.TENSORS:
                getattr(sums, name).copy_(getattr(measured.sums, name))
        else:
            sums += measured.sums

    def result(self) -> dict[str, Any]:
        """The JSON document of `merge_stats.json`; groups are summed in plan order, so the numbers do not
        depend on the order the engine visited the tensors in."""
        plan = self.plan
        document: dict[str, Any] = {
            "hubmerge_version": __version__,
            "method": plan.recipe.method.name,
            "reference": self.reference,
            "models": [s.label for s in plan.models],
        }
        if self.reference is None:
            document["note"] = (
                "not applicable: the recipe has no base, so there are no task vectors θᵢ − θ_base to measure"
            )
            return document
        device = next(iter(self._sums.values())).gram.device
        n = len(plan.models)
        total = _Sums.zeros(n, device)
        layers: dict[int, _Sums] = {}
        tensors = []
        for t in plan.tensors:
            sums = self._sums[t.name]
            total += sums
            found = _LAYER.match(t.name)
            if found:
                layers.setdefault(int(found.group(1)), _Sums.zeros(n, device)).__iadd__(sums)
            tensors.append({"name": t.name, **self._group(sums)})
        if self.trims:
            document["majority_sign"] = (self._sign_sum > 0) - (self._sign_sum < 0)
        document["total"] = self._group(total)
        document["layers"] = [{"layer": i, **self._group(layers[i])} for i in sorted(layers)]
        document["tensors"] = tensors
        return document

    def _group(self, sums: _Sums) -> dict[str, Any]:
        gram = sums.gram.cpu().tolist()
        norm = [math.sqrt(max(gram[i][i], 0.0)) for i in range(len(gram))]
        cosine = [
            [gram[i][j] / (norm[i] * norm[j]) if norm[i] and norm[j] else None for j in range(len(gram))]
            for i in range(len(gram))
        ]
        numel = max(sums.numel, 1)
        group: dict[str, Any] = {
            "numel": sums.numel,
            "norm": norm,
            "cosine": cosine,
            "sign_conflict": int(sums.conflict) / numel,
            "model_conflict": [int(c) / numel for c in sums.model_conflict.tolist()],
        }
        if self.trims:
            # Where the elected sign is 0, the model-wide majority decides: +1 keeps the
            # positive entries; -1 and 0 keep the negative ones (FusionBench's `torch.where(sign > 0, ...)`).
            late = sums.undecided_neg if self._sign_sum > 0 else sums.undecided_pos
            group["kept"] = [int(k) / numel for k in sums.kept.tolist()]
            group["dropped"] = [int(d) / numel for d in (sums.dropped + late).tolist()]
        return group


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def model_summary(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model: whole-model norm, mean per-layer norm, mean cosine to the other models, sign
    conflict share, and for a method that trims the kept and dropped shares; [] when the statistics do not apply."""
    if document.get("reference") is None:
        return []
    total = document["total"]
    rows = []
    for i, label in enumerate(document["models"]):
        others = [c[i] for j, c in enumerate(total["cosine"]) if j != i and c[i] is not None]
        rows.append(
            {
                "model": label,
                "norm": total["norm"][i],
                "mean_layer_norm": _mean([layer["norm"][i] for layer in document["layers"]]),
                "mean_cosine": _mean(others),
                "conflict": total["model_conflict"][i],
                "kept": total["kept"][i] if "kept" in total else None,
                "dropped": total["dropped"][i] if "dropped" in total else None,
            }
        )
    return rows


def number_text(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if percent else f"{value:.4g}"


def summary_text(document: Mapping[str, Any]) -> str:
    """A short terminal summary of `document` (as `MergeStats.result` returns it)."""
    if document.get("reference") is None:
        return f"merge diagnostics: {document['note']}"
    rows = model_summary(document)
    trims = rows[0]["kept"] is not None
    header = ["model", "‖τ‖", "mean layer ‖τ‖", "mean cosine", "sign conflict"] + (
        ["kept", "dropped"] if trims else []
    )
    table = [header]
    for r in rows:
        line = [
            r["model"],
            number_text(r["norm"]),
            number_text(r["mean_layer_norm"]),
            number_text(r["mean_cosine"]),
        ]
        line.append(number_text(r["conflict"], percent=True))
        if trims:
            line += [number_text(r["kept"], percent=True), number_text(r["dropped"], percent=True)]
        table.append(line)
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    share = document["total"]["sign_conflict"]
    lines.append(
        f"task vectors against the base; positions where the models disagree in sign: {number_text(share, True)}"
    )
    return "\n".join(lines)


def write_stats(document: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """Write `merge_stats.json` and the plots into `directory`; return what merge_stats.json holds: `document`
    with `plots`, the plot files written, and without matplotlib `plots_note`, which says why there are none.
    """
    document = dict(document)
    written: list[str] = []
    if document.get("reference") is not None:
        if plots.available():
            written = _plot(document, directory)
        else:
            document["plots_note"] = plots.MISSING
    document["plots"] = written
    (directory / STATS_FILE).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return document


def stats_files(document: Mapping[str, Any]) -> list[str]:
    """The files `write_stats` wrote for `document` (as it returned it)."""
    return [STATS_FILE, *document["plots"]]


def _plot(document: Mapping[str, Any], directory: Path) -> list[str]:
    layers = document["layers"]
    if not layers:
        return []
    labels = document["models"]
    x = [layer["layer"] for layer in layers]
    written = []

    def per_model(key: str) -> dict[str, list[float | None]]:
        return {label: [layer[key][i] for layer in layers] for i, label in enumerate(labels)}

    def chart(key: str, panels: list[plots.Panel]) -> None:
        file, title = PLOTS[key]
        plots.line_chart(directory / file, title, "decoder layer", x, panels)
        written.append(file)

    chart("norms", [plots.Panel("‖θᵢ − θ_base‖₂", per_model("norm"))])
    if len(labels) > 1:
        pairs = {
            f"{labels[i]} · {labels[j]}": [layer["cosine"][i][j] for layer in layers]
            for i in range(len(labels))
            for j in range(i + 1, len(labels))
        }
        chart("cosine", [plots.Panel("cosine", pairs)])
    # Models first, so each keeps its colour in every panel.
    conflicts = per_model("model_conflict") | {"all models": [layer["sign_conflict"] for layer in layers]}
    panels = [plots.Panel("share of positions with a sign conflict", conflicts)]
    if "kept" in layers[0]:
        panels.append(plots.Panel("share kept by trimming", per_model("kept")))
        panels.append(plots.Panel("share dropped by the elected sign", per_model("dropped")))
    chart("signs", panels)
    return written
