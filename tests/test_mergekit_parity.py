"""mergekit's own configs, imported, merge to mergekit's own numbers.

For every deterministic run in tests/mergekit/manifest.json (mergekit 0.1.5 on the tiny checkpoints of
tests/data/mergekit, see tests/mergekit/README.md): `import-mergekit` the ORIGINAL YAML, merge the recipe
with hubmerge, and compare every tensor with mergekit's output:

- float32 outputs: max abs difference 0;
- bfloat16 outputs: at most one bf16 ulp apart (hubmerge rounds a float32 result once);
- where mergekit itself computed in bfloat16 (`dtype: bfloat16`, or no dtype on bfloat16 inputs; the
  importer notes it), hubmerge's float32 arithmetic is the more exact of the two: the bound is the
  rounding mergekit adds, `BF16_COMPUTE_ULPS`;
- methods whose whole-tensor reductions cannot match bit for bit in streaming form: `TOLERANCE`.

A run whose method is not registered yet is a strict expected failure: it fails hard the moment the
method lands without matching mergekit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

import hubmerge
from hubmerge.mergekit_config import import_mergekit
from hubmerge.methods import METHODS

MANIFEST = REPO / "tests" / "mergekit" / "manifest.json"
RUNS = [r for r in json.loads(MANIFEST.read_text())["runs"] if r["deterministic"] and r["returncode"] == 0]
HUBMERGE_NAME = {"ties": "mergekit_ties"}  # hubmerge's `ties` is FusionBench's
# Max abs difference allowed per method, where its notes say its streaming reductions reorder float sums.
TOLERANCE: dict[str, float] = {}
# mergekit's bf16 arithmetic (task vectors, weights rounded to bf16, sums) against hubmerge's float32 one
# rounded once: a few ulps of the result, bounded here.
BF16_COMPUTE_ULPS = 4
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _case(run: dict[str, Any]) -> Any:
    method = HUBMERGE_NAME.get(run["merge_method"], run["merge_method"])
    marks = (
        [pytest.mark.xfail(strict=True, reason=f"method {method} not registered yet")]
        if method not in METHODS
        else []
    )
    return pytest.param(run, id=run["name"], marks=marks)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between `a` and `b` in bf16 steps (adjacent bf16 values are 1 apart)."""

    def key(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        magnitude = bits & 0x7FFF
        return torch.where(bits < 0, -magnitude, magnitude)

    return int((key(a) - key(b)).abs().max()) if a.numel() else 0


def merged_by_hubmerge(run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # mergekit-yaml ran in the input set's folder: the YAML's model names (`base`, `m0`) resolve there.
    monkeypatch.chdir(REPO / run["cwd"])
    recipe = tmp_path / "recipe.toml"
    imported = import_mergekit(REPO / run["config"], recipe)
    # The tiny inputs have no license; the card needs one.
    recipe.write_text(imported.text + '\n[card]\nlicense = "apache-2.0"\n')
    result = hubmerge.merge(recipe, output_dir=tmp_path / "out", push=False, quiet=True, stats=False)
    files = sorted(result.output_dir.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors |= load_file(file)
    return imported, tensors


def mergekit_computed_in_bf16(run: dict[str, Any]) -> bool:
    import yaml

    config = yaml.safe_load((REPO / run["config"]).read_text())
    if run["merge_method"] in ("linear", "slerp"):  # both compute in float32 whatever they load
        return False
    dtype = config.get("dtype")
    return dtype == "bfloat16" or (dtype is None and run["input_set"].startswith("bf16"))


@pytest.mark.parametrize("run", [_case(r) for r in RUNS])
def test_the_imported_recipe_merges_to_mergekits_output(run, tmp_path, monkeypatch):
    imported, ours = merged_by_hubmerge(run, tmp_path, monkeypatch)
    theirs = load_file(REPO / run["output"] / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    rebuilt_vocab = any(n.startswith(("tokenizer_source:", "tokenizer.source:")) for n in imported.notes)
    tolerance = TOLERANCE.get(imported.method, 0.0)
    for name, expected in theirs.items():
        actual = ours[name]
        assert actual.dtype == expected.dtype, name
        if rebuilt_vocab and name in VOCAB_TENSORS:
            # mergekit rebuilds the embedding rows for the tokenizer (120 tokens); hubmerge keeps the
            # sources' 128 rows, as the importer's note says: the tokenizer's rows must be equal.
            assert (expected.shape[0], actual.shape[0]) == (120, 128), name
            actual = actual[: expected.shape[0]]
        assert actual.shape == expected.shape, name
        difference = float((actual.float() - expected.float()).abs().max())
        if expected.dtype == torch.float32:
            assert difference <= tolerance, (name, difference)
        elif mergekit_computed_in_bf16(run):
            assert ulps(actual, expected) <= BF16_COMPUTE_ULPS or difference <= tolerance, (name, difference)
        else:
            assert ulps(actual, expected) <= 1 or difference <= tolerance, (name, difference)


def test_ulps_counts_bf16_steps_across_zero():
    values = torch.tensor([1.0, 1.0078125, -0.0, 0.0, 1e-40], dtype=torch.bfloat16)
    assert ulps(values[:1], values[1:2]) == 1  # 1 and the next bf16 after it
    assert ulps(values[2:3], values[3:4]) == 0  # -0 and +0
    assert ulps(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.bfloat16)) == 2 * 0x3F80
