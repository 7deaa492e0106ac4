"""Each method against a straightforward reference formula written here, on random tiny checkpoints.

The references follow FusionBench's algorithms run in float32 on whole state dicts (TIES: one flattened
vector per model, `kthvalue`, sign election with the majority rule) and mergekit's `linear`; the engine
streams slices, so agreement here is the proof that streaming changed nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.reference import (
    HEAD,
    POOL,
    assert_close,
    load_f32,
    ref_linear,
    ref_simple_average,
    ref_task_arithmetic,
    ref_ties,
    ref_ties_per_tensor,
    with_head,
)

import hubmerge


def run(
    write_recipe: Callable[[str], Path], tmp_path: Path, body: str, out: str = "out"
) -> dict[str, torch.Tensor]:
    recipe = write_recipe(body + f'\n[output]\ndir = "{out}"\n')
    result = hubmerge.merge(recipe, push=False, quiet=True, log=lambda _: None)
    return load_f32(result.output_dir)


@pytest.fixture
def pool(
    make_model: Callable[..., Path],
) -> Callable[..., tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]]:
    def make(dtype: torch.dtype = torch.bfloat16, shards: int = 1, heads: tuple[bool, ...] = (False,) * 4):
        folders = [
            make_model(name, seed, head=h, dtype=dtype, shards=shards)
            for name, seed, h in zip(("base", "math", "code", "instruct"), (0, 1, 2, 3), heads)
        ]
        sds = [load_f32(f) for f in folders]
        return sds[0], sds[1:]

    return make


# --- tests -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 3])
def test_simple_average_matches_reference_and_excludes_base(pool, write_recipe, tmp_path, dtype, shards):
    _, models = pool(dtype, shards)
    got = run(write_recipe, tmp_path, 'method = "simple_average"\n' + POOL)
    assert_close(got, ref_simple_average(models), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_weighted_mean(pool, write_recipe, tmp_path, dtype):
    _, models = pool(dtype)
    got = run(
        write_recipe,
        tmp_path,
        'method = "linear"\n'
        '[[models]]\nsource = "models/math"\nweight = 0.5\n'
        '[[models]]\nsource = "models/code"\nweight = 0.3\n'
        '[[models]]\nsource = "models/instruct"\nweight = 0.2\n',
    )
    assert_close(got, ref_linear(models, [0.5, 0.3, 0.2]), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 2])
def test_task_arithmetic_matches_reference(pool, write_recipe, tmp_path, dtype, shards):
    base, models = pool(dtype, shards)
    got = run(
        write_recipe, tmp_path, 'method = "task_arithmetic"\n' + POOL + "[parameters]\nscaling_factor = 0.8\n"
    )
    assert_close(got, ref_task_arithmetic(base, models, 0.8), dtype)


@pytest.mark.slow
def test_task_arithmetic_per_model_weights(pool, write_recipe, tmp_path):
    base, models = pool(torch.float32)
    got = run(
        write_recipe,
        tmp_path,
        'method = "task_arithmetic"\nbase = "models/base"\n'
        '[[models]]\nsource = "models/math"\nweight = 2.0\n'
        '[[models]]\nsource = "models/code"\n'
        '[[models]]\nsource = "models/instruct"\nweight = -0.5\n'
        "[parameters]\nscaling_factor = 0.3\n",
    )
    assert_close(got, ref_task_arithmetic(base, models, 0.3, [2.0, 1.0, -0.5]), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 3])
def test_ties_matches_fusionbench_global_trim(pool, write_recipe, tmp_path, dtype, shards):
    base, models = pool(dtype, shards)
    got = run(
        write_recipe,
        tmp_path,
        'method = "ties"\n' + POOL + "[parameters]\nscaling_factor = 0.8\nthreshold = 20\n",
    )
    assert_close(got, ref_ties(base, models, 0.8), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("merge_func", ["mean", "max"])
def test_ties_merge_funcs(pool, write_recipe, tmp_path, merge_func):
    base, models = pool(torch.float32)
    got = run(
        write_recipe,
        tmp_path,
        'method = "ties"\n'
        + POOL
        + f'[parameters]\nscaling_factor = 0.5\nthreshold = 35\nmerge_func = "{merge_func}"\n',
    )
    assert_close(got, ref_ties(base, models, 0.5, 35, merge_func), torch.float32)


@pytest.mark.slow
def test_ties_per_tensor_trim_differs_from_global(pool, write_recipe, tmp_path):
    base, models = pool(torch.float32)
    got = run(
        write_recipe,
        tmp_path,
        'method = "ties"\n' + POOL + '[parameters]\nscaling_factor = 0.8\ntrim = "tensor"\n',
    )
    assert_close(got, ref_ties_per_tensor(base, models, 0.8), torch.float32)
    global_ = ref_ties(base, models, 0.8)
    assert max((got[k] - global_[k]).abs().max().item() for k in got) > 1e-3


@pytest.mark.slow
def test_ties_exact_zero_sum_takes_the_negative_majority(make_model, write_recipe, tmp_path):
    """Where trimmed task vectors cancel exactly, FusionBench uses the model-wide majority sign."""
    base = {k: torch.zeros_like(v) for k, v in random_state_dict(0).items()}
    a = {k: torch.full_like(v, -1.0) for k, v in base.items()}  # majority of elected signs: negative
    b = {k: torch.full_like(v, -1.0) for k, v in base.items()}
    a["model.norm.weight"][:4] = torch.tensor([2.0, -2.0, 3.0, 4.0])
    b["model.norm.weight"][:4] = torch.tensor([-2.0, 2.0, -3.0, 4.0])  # exact cancellation at positions 0..2
    for name, sd in (("base", base), ("a", a), ("b", b)):
        write_checkpoint(tmp_path / "models" / name, sd, dtype=torch.float32)
    got = run(
        write_recipe,
        tmp_path,
        'method = "ties"\nbase = "models/base"\nmodels = ["models/a", "models/b"]\n'
        "[parameters]\nscaling_factor = 1.0\nthreshold = 100\n",
    )
    want = ref_ties(base, [a, b], 1.0, 100)
    assert_close(got, want, torch.float32)
    assert got["model.norm.weight"][:4].tolist() == [-2.0, -2.0, -3.0, 8.0]
    assert not list((tmp_path / "out").glob(".*")), "the spilled undecided positions were left behind"


def test_mixed_tied_and_untied_sources_write_a_real_untied_head(pool, write_recipe, tmp_path):
    base, models = pool(torch.float32, heads=(False, True, False, False))
    got = run(
        write_recipe, tmp_path, 'method = "task_arithmetic"\n' + POOL + "[parameters]\nscaling_factor = 0.8\n"
    )
    want = ref_task_arithmetic(with_head(base), [with_head(m) for m in models], 0.8)
    assert_close(got, want, torch.float32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


@pytest.mark.slow
def test_all_tied_sources_stay_tied_without_a_head(pool, write_recipe, tmp_path):
    pool(torch.bfloat16)
    got = run(write_recipe, tmp_path, 'method = "ties"\n' + POOL)
    assert HEAD not in got
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"


@pytest.mark.slow
def test_output_dtype_override_and_sharded_output(pool, write_recipe, tmp_path):
    base, models = pool(torch.bfloat16)
    recipe = write_recipe(
        'method = "task_arithmetic"\ndtype = "float32"\n'
        + POOL
        + '[parameters]\nscaling_factor = 0.8\n[output]\ndir = "out"\nmax_shard_size = "100KB"\n'
    )
    out = hubmerge.merge(recipe, push=False, quiet=True, log=lambda _: None).output_dir
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in base.values())
    assert_close(load_f32(out), ref_task_arithmetic(base, models, 0.8), torch.float32)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
