"""The diagnostics measured inside the merge (`MergeStats.measure` on the merge threads, beside each piece's
merge) against the computation they replaced: a separate pass over the same pieces on one thread, with
boolean masks (`reference_add` below, the package's code before the fusion, kept here as the reference).

Three ways to measure: the compiled kernel (`quality.kernel`, the default on a CPU), and the torch path's
numpy counts (a CPU without the kernel) and arithmetic counts (an accelerator). Counts are exact every way.
The torch paths take the float64 dot products by the same operations on the same pieces as the reference,
so their documents equal it to the bit, NaN included; the kernel adds the same exact products in another
order, so its norms and cosines equal the reference's to 1e-12, relative."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from support.checkpoints import TINY, random_state_dict, write_checkpoint

import hubmerge.merging.engine
import hubmerge.quality.diagnostics
import hubmerge.quality.kernel
from hubmerge import api
from hubmerge.merging.engine import _cuts, _open_inputs, _Passes
from hubmerge.merging.plan import OutputTensor
from hubmerge.quality.diagnostics import _BLOCK, MergeStats, _Sums

MODELS = ("math", "coder", "instruct")


def _row_counts(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.count_nonzero(row) for row in rows])


def reference_add(
    stats: MergeStats, tensor: OutputTensor, slices: Sequence[torch.Tensor], cuts: Sequence[float] | None
) -> None:
    """`MergeStats.add` as it was before the fusion (boolean masks, trimming by masked_fill)."""
    plan = stats.plan
    if stats.reference is None:
        return
    if plan.recipe.method.uses_base:
        base, models = slices[0], slices[1:]
    else:
        base, models = slices[-1], slices[:-1]
    base = base.to(plan.compute_dtype)
    n = len(models)
    task_vectors = torch.empty((n, base.numel()), dtype=base.dtype, device=base.device)
    for row, model in zip(task_vectors, models, strict=True):
        torch.sub(model.flatten(), base.flatten(), out=row)
    sums = _Sums.zeros(n, task_vectors.device)
    sums.numel = task_vectors.shape[1]
    for block in torch.split(task_vectors, _BLOCK, dim=1):
        as64 = block.to(torch.float64)
        sums.gram.addmm_(as64, as64.T)
    conflict = (task_vectors.amax(dim=0) > 0) & (task_vectors.amin(dim=0) < 0)
    sums.conflict = torch.count_nonzero(conflict)
    sums.model_conflict = _row_counts([(row != 0) & conflict for row in task_vectors])
    if stats.trims:
        assert cuts is not None
        for row, cut in zip(task_vectors, cuts, strict=True):
            row.masked_fill_(row.abs() < cut, 0.0)
        elected = torch.sign(task_vectors.sum(dim=0))
        stats._sign_sum += float(elected.sum(dtype=torch.float64))
        undecided = elected == 0
        sums.kept = _row_counts(list(task_vectors))
        sums.dropped = _row_counts([row * elected < 0 for row in task_vectors])
        sums.undecided_pos = _row_counts([(row > 0) & undecided for row in task_vectors])
        sums.undecided_neg = _row_counts([(row < 0) & undecided for row in task_vectors])
    if tensor.name in stats._sums:
        stats._sums[tensor.name] += sums
    else:
        stats._sums[tensor.name] = sums


def reference_stats(recipe: Path) -> dict[str, Any]:
    """The old `engine.collect_stats`: the method's passes, then every piece of every tensor on this thread."""
    plan = api.load_plan(recipe)
    stats = MergeStats(plan)
    with api._weights(plan, api._fetch_all(plan, quiet=True)) as (folders, _):
        inputs = _open_inputs(plan, folders, torch.device("cpu"), stats)
        try:
            passes = _Passes(plan, inputs)
            passes.before_merge()
            for tensor in plan.tensors:
                cuts = _cuts(plan, passes.for_tensor(tensor))
                for _, _, slices in inputs.stream([tensor]):
                    reference_add(stats, tensor, slices, cuts)
        finally:
            inputs.close()
    return stats.result()


def as_text(document: dict[str, Any]) -> str:
    """The document without what `write_stats` adds, as JSON: floats compared by their exact repr, NaN too."""
    return json.dumps({k: v for k, v in document.items() if k not in ("plots", "plots_note")}, sort_keys=True)


def assert_same(document: dict[str, Any], expected: dict[str, Any], counts: str) -> None:
    """To the bit for the torch paths; for the kernel, every count to the bit and the norms and cosines
    (the Gram matrix's) to 1e-12."""
    if counts != "kernel":
        assert as_text(document) == as_text(expected)
        return

    def close(a: Any, b: Any, gram: bool) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k], gram or k in ("norm", "cosine")) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(close(x, y, gram) for x, y in zip(a, b, strict=True))
        if gram and isinstance(a, float) and isinstance(b, float):
            return (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=1e-12)
        return json.dumps(a) == json.dumps(b)

    plain = {k: v for k, v in document.items() if k not in ("plots", "plots_note")}
    assert close(plain, {k: v for k, v in expected.items() if k not in ("plots", "plots_note")}, False)


def measuring(monkeypatch: pytest.MonkeyPatch, counts: str) -> list[int]:
    """Measure `counts`'s way; returns a list that holds the number of pieces the kernel measured."""
    monkeypatch.setattr(hubmerge.quality.kernel, "ENABLED", counts == "kernel")
    monkeypatch.setattr(hubmerge.quality.diagnostics, "_NUMPY_COUNTS", counts == "numpy")
    measured = [0]
    compiled = hubmerge.quality.kernel.measure

    def counted(*args: Any) -> Any:
        result = compiled(*args)
        measured[0] += result is not None
        return result

    monkeypatch.setattr(hubmerge.quality.kernel, "measure", counted)
    return measured


def tiny_recipe(method: str, extra: str = "") -> str:
    models = ", ".join(f'"{TINY / m}"' for m in MODELS)
    text = f'method = "{method}"\nbase = "{TINY / "base"}"\nmodels = [{models}]\n{extra}'
    if method == "ties":
        text += "[parameters]\nscaling_factor = 0.8\nthreshold = 20\n"
    return text


@pytest.mark.slow
@pytest.mark.parametrize("counts", ["kernel", "numpy", "arithmetic"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "simple_average"])
def test_fused_stats_of_merge_and_inspect_equal_the_separate_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, counts: str
) -> None:
    # The kernel on a CPU; without it numpy's compares count, and the arithmetic (sign vectors, matrix
    # products) on an accelerator.
    kernel_pieces = measuring(monkeypatch, counts)
    # Small pieces: the larger tensors are several pieces, merged by two threads and recorded in order.
    monkeypatch.setattr(hubmerge.merging.engine, "_PIECE_ELEMENTS", 4096)
    monkeypatch.setattr(hubmerge.merging.engine, "_merge_threads", lambda device: 2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plots: they are not what is compared
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe(method))
    expected = reference_stats(recipe)
    assert expected["total"]["norm"][0] > 0 and 0 < expected["total"]["sign_conflict"] < 1
    if method == "ties":
        assert 0 < expected["total"]["dropped"][0] < expected["total"]["kept"][0] < 1

    merged = api.merge(recipe, output_dir=tmp_path / "out", push=False, quiet=True, sanity=False).stats
    inspected = api.inspect(recipe, output_dir=tmp_path / "inspect", quiet=True).stats
    assert merged is not None
    assert (kernel_pieces[0] > 0) == (counts == "kernel")
    assert_same(merged, expected, counts)
    assert as_text(inspected) == as_text(merged)  # `hubmerge inspect` measures as the merge does, to the bit


@pytest.mark.slow
@pytest.mark.parametrize("counts", ["kernel", "numpy", "arithmetic"])
def test_fused_ties_counts_equal_the_separate_pass_where_sums_cancel_and_inputs_hold_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counts: str
) -> None:
    """Exact cancellations (the elected sign is 0: undecided entries, both signs), a zero task vector,
    and NaN and ±Inf in the sources of a recipe that allows them; counted every way."""
    kernel_pieces = measuring(monkeypatch, counts)
    base = {k: torch.zeros_like(v) for k, v in random_state_dict(0).items()}
    a = {k: v.clone() for k, v in random_state_dict(1).items()}
    b = {k: -v for k, v in a.items()}  # cancels a everywhere
    c = {k: v.clone() for k, v in random_state_dict(2).items()}
    b["model.norm.weight"][:8] = c["model.norm.weight"][:8]  # some positions no longer cancel
    c["model.layers.0.input_layernorm.weight"][:] = 0.0  # nothing to keep
    a["model.layers.1.mlp.up_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    c["model.layers.1.mlp.up_proj.weight"][0, 1] = -float("inf")  # +inf + -inf: a NaN sum
    for name, sd in (("base", base), ("a", a), ("b", b), ("c", c)):
        write_checkpoint(tmp_path / name, sd, dtype=torch.float32)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'method = "ties"\nbase = "base"\nmodels = ["a", "b", "c"]\nallow_non_finite = true\n'
        '[parameters]\nscaling_factor = 1.0\nthreshold = 60\ntrim = "tensor"\n'
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    expected = reference_stats(recipe)
    up = next(t for t in expected["tensors"] if t["name"] == "model.layers.1.mlp.up_proj.weight")
    norm = next(t for t in expected["tensors"] if t["name"] == "model.norm.weight")
    assert up["norm"][0] != up["norm"][0]  # NaN: the case is exercised
    assert sum(norm["dropped"]) > 0 and sum(up["dropped"]) > 0

    inspected = api.inspect(recipe, output_dir=tmp_path / "inspect", quiet=True).stats
    assert (kernel_pieces[0] > 0) == (counts == "kernel")
    assert_same(inspected, expected, counts)
