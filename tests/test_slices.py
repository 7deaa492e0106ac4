"""The merge reference tests again, with the engine's slice size forced small and odd.

`plan.CHUNK_ELEMENTS` is read at call time, so patching it makes every tensor of the tiny checkpoints
(`support.reference.NARROW`: hidden 16, since every slice is a read and a write) span many slices: with 7
elements a 2-D tensor is read one row at a time and the 16-element norms and biases in slices of 7, 7, 2;
with 101 a (64, 16) embedding is read 6 rows at a time. The TIES
magnitude selection then sees hundreds of uneven chunks and the majority-sign patch rewrites positions
scattered over many slices and shards. Each merge must still equal the reference formula, and its
output files must be byte for byte those of the same merge with the default slice size, and of the merge
computed in small pieces (`engine._PIECE_ELEMENTS`) on one merge thread or two.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from support.reference import (
    POOL,
    assert_close,
    cancelling_pool,
    load_f32,
    narrow_model,
    ref_linear,
    ref_simple_average,
    ref_task_arithmetic,
    ref_ties,
    ref_ties_per_tensor,
    with_head,
)

import hubmerge
from hubmerge.merging import engine
from hubmerge.merging import plan as plan_module

SMALL_SLICES = (7, 101)
StateDict = dict[str, torch.Tensor]
Reference = Callable[[StateDict, list[StateDict]], StateDict]


class Method(NamedTuple):
    recipe: str
    reference: Reference


METHODS = {
    "simple_average": Method(
        'method = "simple_average"\n' + POOL, lambda base, models: ref_simple_average(models)
    ),
    "linear": Method(
        'method = "linear"\nbase = "models/base"\n'
        '[[models]]\nsource = "models/math"\nweight = 0.5\n'
        '[[models]]\nsource = "models/code"\nweight = 0.3\n'
        '[[models]]\nsource = "models/instruct"\nweight = 0.2\n',
        lambda base, models: ref_linear(models, [0.5, 0.3, 0.2]),
    ),
    "task_arithmetic": Method(
        'method = "task_arithmetic"\nbase = "models/base"\n'
        '[[models]]\nsource = "models/math"\nweight = 2.0\n'
        '[[models]]\nsource = "models/code"\n'
        '[[models]]\nsource = "models/instruct"\nweight = -0.5\n'
        "[parameters]\nscaling_factor = 0.3\n",
        lambda base, models: ref_task_arithmetic(base, models, 0.3, [2.0, 1.0, -0.5]),
    ),
    "ties_global_sum": Method(
        'method = "ties"\n' + POOL + "[parameters]\nscaling_factor = 0.8\nthreshold = 20\n",
        lambda base, models: ref_ties(base, models, 0.8),
    ),
    "ties_global_mean": Method(
        'method = "ties"\n'
        + POOL
        + '[parameters]\nscaling_factor = 0.5\nthreshold = 35\nmerge_func = "mean"\n',
        lambda base, models: ref_ties(base, models, 0.5, 35, "mean"),
    ),
    "ties_global_max": Method(
        'method = "ties"\n'
        + POOL
        + '[parameters]\nscaling_factor = 0.5\nthreshold = 35\nmerge_func = "max"\n',
        lambda base, models: ref_ties(base, models, 0.5, 35, "max"),
    ),
    "ties_tensor_sum": Method(
        'method = "ties"\n' + POOL + '[parameters]\nscaling_factor = 0.8\ntrim = "tensor"\n',
        lambda base, models: ref_ties_per_tensor(base, models, 0.8),
    ),
}


class Layout(NamedTuple):
    dtype: torch.dtype
    shards: int  # input shards; sharded inputs are also written as sharded outputs
    heads: tuple[bool, bool, bool, bool]  # which of base, math, code, instruct store lm_head


LAYOUTS = {
    "f32-single-tied": Layout(torch.float32, 1, (False, False, False, False)),
    "bf16-sharded-untied": Layout(torch.bfloat16, 3, (True, True, True, True)),
    "bf16-single-mixed": Layout(torch.bfloat16, 1, (False, True, False, False)),
    "f32-sharded-mixed": Layout(torch.float32, 2, (True, False, True, False)),
}


def merge_files(recipe: Path, out: str) -> dict[str, bytes]:
    # Only the weights are compared: no diagnostics (their plots cost seconds per merge).
    result = hubmerge.merge(
        recipe, output_dir=recipe.parent / out, push=False, quiet=True, stats=False, log=lambda _: None
    )
    assert result.output_dir == recipe.parent / out
    assert not list(recipe.parent.glob(f"{out}/.*")), "a scratch file was left behind"
    return {p.name: p.read_bytes() for p in sorted((recipe.parent / out).glob("model*"))}


def check_small_slices_match(
    monkeypatch: pytest.MonkeyPatch, recipe: Path, want: StateDict, dtype: torch.dtype
) -> None:
    """Default slices, then each small size: reference values, and the same bytes every time."""
    default = merge_files(recipe, "out-default")
    assert_close(load_f32(recipe.parent / "out-default"), want, dtype)
    for elements in SMALL_SLICES:
        monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", elements)
        small = merge_files(recipe, f"out-{elements}")
        assert_close(load_f32(recipe.parent / f"out-{elements}"), want, dtype)
        assert sorted(small) == sorted(default)
        for name in default:
            assert small[name] == default[name], f"{name} differs with {elements}-element slices"
    # Whole slices computed in pieces of a few rows (a 16-element row each), on one merge thread and on
    # two: the same bytes again.
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1 << 22)
    monkeypatch.setattr(engine, "_PIECE_ELEMENTS", 40)
    for threads in (1, 2):
        monkeypatch.setattr(engine, "_merge_threads", lambda device, n=threads: n)
        pieces = merge_files(recipe, f"out-pieces-{threads}")
        assert pieces == default, f"computing in pieces on {threads} thread(s) changed the output"


# Each method once, the layouts spread over them so that every dtype, single-file and sharded inputs,
# tied, untied and mixed heads all meet small slices (TIES global sum, the default, on two layouts). The
# whole cross product would cost minutes: every slice of 7 elements is a separate read and write.
CASES = [
    ("simple_average", "bf16-sharded-untied"),
    ("linear", "f32-single-tied"),
    ("task_arithmetic", "bf16-single-mixed"),
    ("ties_global_sum", "bf16-sharded-untied"),
    ("ties_global_sum", "f32-single-tied"),
    ("ties_global_mean", "f32-sharded-mixed"),
    ("ties_global_max", "bf16-single-mixed"),
    ("ties_tensor_sum", "f32-sharded-mixed"),
]
VOCAB = 64  # a short embedding keeps the slice count (and the run time) small; it still spans many slices


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "layout"),
    [(METHODS[m], LAYOUTS[layout]) for m, layout in CASES],
    ids=[f"{m}-{layout}" for m, layout in CASES],
)
def test_small_odd_slices_match_the_reference_and_the_default_slices(tmp_path, monkeypatch, method, layout):
    folders = [
        narrow_model(
            tmp_path / "models" / name, seed, VOCAB, head=head, dtype=layout.dtype, shards=layout.shards
        )
        for name, seed, head in zip(("base", "math", "code", "instruct"), range(4), layout.heads)
    ]
    base, *models = [load_f32(f) for f in folders]
    if any(layout.heads):  # the output gets a real head: a tied source's head is its embedding
        base, models = with_head(base), [with_head(m) for m in models]
    output = '\n[output]\ndir = "out"\n' + ('max_shard_size = "4KB"\n' if layout.shards > 1 else "")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(method.recipe + output)
    check_small_slices_match(monkeypatch, recipe, method.reference(base, models), layout.dtype)
    if layout.shards > 1:
        assert len(list((tmp_path / "out-default").glob("model-*.safetensors"))) >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("majority", "dtype"),
    [(-1, torch.float32), (0, torch.bfloat16), (1, torch.bfloat16)],
    ids=["negative-f32", "none-bf16", "positive-bf16"],
)
def test_exact_zero_sign_sums_are_patched_across_slices_and_shards(tmp_path, monkeypatch, dtype, majority):
    base, models = cancelling_pool(tmp_path, majority, dtype, narrow=True)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'method = "ties"\nbase = "models/base"\nmodels = ["models/a", "models/b"]\n'
        '[parameters]\nscaling_factor = 1.0\nthreshold = 100\n[output]\ndir = "out"\nmax_shard_size = "4KB"\n'
    )
    want = ref_ties(base, models, 1.0, 100)
    check_small_slices_match(monkeypatch, recipe, want, dtype)
    got = load_f32(tmp_path / "out-7")
    embed = got["model.embed_tokens.weight"].reshape(-1)
    a = models[0]["model.embed_tokens.weight"].reshape(-1)
    cancelled = embed[1::3]
    if majority == -1:  # the negative entry wins at every cancelled position
        assert torch.equal(cancelled, -a[1::3].abs().to(dtype).float())
    elif majority == 1:
        assert torch.equal(cancelled, a[1::3].abs().to(dtype).float())
    else:  # a zero majority elects no sign, and FusionBench's `where(sign > 0, τ > 0, τ < 0)` keeps τ < 0
        assert torch.equal(cancelled, -a[1::3].abs().to(dtype).float())
    assert len(list((tmp_path / "out-7").glob("model-*.safetensors"))) >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("majority", "dtype", "merge_func", "trim"),
    [
        (-1, torch.float32, "sum", "global"),
        (0, torch.bfloat16, "mean", "global"),
        (1, torch.bfloat16, "sum", "tensor"),
        (-1, torch.bfloat16, "max", "tensor"),
    ],
    ids=[
        "negative-f32-sum-global",
        "none-bf16-mean-global",
        "positive-bf16-sum-tensor",
        "negative-bf16-max-tensor",
    ],
)
def test_settling_the_majority_sign_first_writes_the_patched_bytes_and_rewrites_no_shard(
    tmp_path: Path, majority: int, dtype: torch.dtype, merge_func: str, trim: str
) -> None:
    """A plan that deletes uploaded shards runs TIES's `majority` pass before the merge (`Method.settle`):
    every shard is final when it closes, and holds the bytes the end-of-merge patch writes otherwise."""
    from hubmerge.api import _fetch_all, load_plan
    from hubmerge.merging.engine import write_weights

    base, models = cancelling_pool(tmp_path, majority, dtype, narrow=True)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'method = "ties"\nbase = "models/base"\nmodels = ["models/a", "models/b"]\n[parameters]\n'
        f'scaling_factor = 1.0\nthreshold = {100 if trim == "global" else 50}\nmerge_func = "{merge_func}"\n'
        f'trim = "{trim}"\n'
        '[output]\nrepo = "user/never-pushed"\nmax_shard_size = "4KB"\n'
    )
    written: dict[str, dict[str, bytes]] = {}
    for kind, delete_uploaded in (("patched", False), ("settled", True)):
        plan = load_plan(recipe, tmp_path / kind, delete_uploaded=delete_uploaded)
        assert plan.disk.settle_first is delete_uploaded and plan.rewrites_shards is not delete_uploaded
        assert [p.name for p in plan.passes][-1:] == (["majority"] if delete_uploaded else ["cut"])
        out = tmp_path / kind
        out.mkdir()
        closed: dict[str, bytes] = {}
        files = write_weights(
            plan,
            _fetch_all(plan, quiet=True),
            out,
            torch.device("cpu"),
            lambda _: None,
            on_shard=lambda path, closed=closed: closed.setdefault(path.name, path.read_bytes()),
        )
        final = {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}
        assert len(final) >= 2
        if delete_uploaded:  # each shard, as it closed, is final and its hash is known
            assert closed == final and all(files[name] is not None for name in final)
        elif majority <= 0:  # the patch rewrote shards after they closed
            assert closed != final and any(files[name] is None for name in final)
        written[kind] = final
    assert written["settled"] == written["patched"]
    if trim == "global":  # the patched output against FusionBench's formula (per tensor: `CASES` above)
        assert_close(load_f32(tmp_path / "settled"), ref_ties(base, models, 1.0, 100, merge_func), dtype)


def test_only_a_method_that_leaves_positions_open_opens_a_scratch_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's scratch file of open positions (`methods.Deferred`) exists for TIES merging into a folder
    it may patch, and for no other run: not for a method without a `deferral`, not when the majority sign
    is settled first. The patch still makes the output right (the case above)."""
    from hubmerge.api import _fetch_all, load_plan
    from hubmerge.publish.files import SCRATCH_FILE

    opened: list[str] = []
    original = engine._Patches.__init__

    def spy(self: engine._Patches, scratch: Path, *args: object) -> None:
        opened.append(scratch.name)
        original(self, scratch, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine._Patches, "__init__", spy)
    cancelling_pool(tmp_path, -1, torch.float32, narrow=True)
    runs = [("task_arithmetic", False), ("ties", True), ("ties", False)]
    for method, delete_uploaded in runs:
        recipe = tmp_path / f"{method}.toml"
        recipe.write_text(
            f'method = "{method}"\nbase = "models/base"\nmodels = ["models/a", "models/b"]\n'
            '[output]\nrepo = "user/never-pushed"\n'
        )
        out = tmp_path / f"{method}-{delete_uploaded}"
        out.mkdir()
        plan = load_plan(recipe, out, delete_uploaded=delete_uploaded)
        engine.write_weights(plan, _fetch_all(plan, quiet=True), out, torch.device("cpu"), lambda _: None)
        assert not (out / SCRATCH_FILE).exists()
    assert opened == [SCRATCH_FILE]  # the last run only
