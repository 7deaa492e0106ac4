"""hubmerge's geometric methods against mergekit 0.1.5's own outputs (tests/mergekit/README.md).

Each case is the hubmerge recipe equivalent to one `tests/mergekit/configs/*.yml`, merged from the same
input folders. hubmerge gathers the inner products in float64 slice by slice where mergekit sums float32
over the whole tensor, so bit identity is out of reach; measured differences (ulp of the tensor's largest
magnitude) and the bounds tested:

- `dtype: float32` configs (float32 outputs): slerp ≤ 3, nuslerp ≤ 1.5, model_stock ≤ 3, multislerp
  ≤ 2.5, karcher ≤ 5 ulp; tested max |hubmerge − mergekit| ≤ 1e-6 × max |mergekit| per tensor. For karcher
  and multislerp hubmerge is the closer of the two to a float64 computation (karcher 1.1 ulp against
  mergekit's 4.2): the difference is mergekit's float32 rounding of every iterate.
- slerp with `dtype: bfloat16` on the bf16 inputs (mergekit computes in float32 and rounds once): every
  element within one bf16 ulp of mergekit's (measured: 1 element of 36256 differs).
- `dtype: bfloat16` where mergekit rounds float32 inputs to bf16 before merging, or computes the whole
  method in bf16 (nuslerp, multislerp): hubmerge computes in float32 from the stored inputs and rounds
  once, so these are bounded, not matched: ≤ 2 bf16 ulp of the tensor's largest magnitude (measured 1 to 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hubmerge

DATA = Path(__file__).resolve().parent / "data" / "mergekit"
SETS = ("f32-tied", "bf16-untied")
T_FILTERS = (
    't = [{filter = "self_attn", value = [0, 0.5, 0.3, 0.7, 1]}, '
    '{filter = "mlp", value = [1, 0.5, 0.7, 0.3, 0]}, {value = 0.5}]'
)


def weighted(
    method: str, base: bool, weights: dict[str, float], params: str = "", dtype: str = "float32"
) -> str:
    text = f'method = "{method}"\ndtype = "{dtype}"\n' + ('base = "{M}/base"\n' if base else "")
    if params:
        text += f"[parameters]\n{params}\n"
    return text + "".join(f'[[models]]\nsource = "{{M}}/{m}"\nweight = {w}\n' for m, w in weights.items())


# config name -> (hubmerge recipe with {M} for the input set's folder, how it is compared)
CASES = {
    "slerp-scalar-f32": (
        'method = "slerp"\nbase = "{M}/m2"\nmodels = ["{M}/m0"]\ndtype = "float32"\n[parameters]\nt = 0.3\n',
        "f32",
    ),
    "slerp-filter-gradient": (
        f'method = "slerp"\nbase = "{{M}}/base"\nmodels = ["{{M}}/m0"]\ndtype = "bfloat16"\n[parameters]\n{T_FILTERS}\n',
        "bf16",
    ),
    "slerp-filter-gradient-slices": (
        f'method = "slerp"\nbase = "{{M}}/base"\nmodels = ["{{M}}/m0"]\ndtype = "bfloat16"\n[parameters]\n{T_FILTERS}\n',
        "bf16",
    ),
    "nuslerp-base": (weighted("nuslerp", True, {"m0": 0.4, "m2": 0.6}), "f32"),
    "nuslerp-nobase": (weighted("nuslerp", False, {"m0": 0.5, "m2": 0.5}, dtype="bfloat16"), "bf16-compute"),
    "nuslerp-columnwise": (
        weighted(
            "nuslerp", True, {"m0": 0.3, "m1": 0.7}, "nuslerp_flatten = false\nnuslerp_row_wise = false"
        ),
        "f32",
    ),
    "nuslerp-rowwise": (
        weighted("nuslerp", True, {"m0": 0.3, "m1": 0.7}, "nuslerp_flatten = false\nnuslerp_row_wise = true"),
        "f32",
    ),
    "multislerp-base": (weighted("multislerp", True, {"m0": 0.5, "m1": 0.3, "m2": 0.2}), "f32"),
    "multislerp-nobase": (
        weighted("multislerp", False, {"m0": 1.0, "m1": 1.0, "m2": 2.0}, dtype="bfloat16"),
        "bf16-compute",
    ),
    "karcher": (
        'method = "karcher"\nmodels = ["{M}/m0", "{M}/m1", "{M}/m2"]\ndtype = "float32"\n'
        "[parameters]\nmax_iter = 10\ntol = 1e-5\n",
        "f32",
    ),
    "model_stock": (
        'method = "model_stock"\nbase = "{M}/base"\nmodels = ["{M}/m0", "{M}/m1", "{M}/m2"]\ndtype = "float32"\n',
        "f32",
    ),
    "model_stock-filter-wise": (
        'method = "model_stock"\nbase = "{M}/base"\nmodels = ["{M}/m0", "{M}/m1", "{M}/m2"]\ndtype = "float32"\n'
        "[parameters]\nfilter_wise = true\n",
        "f32",
    ),
}

pytestmark = pytest.mark.skipif(not (DATA / "outputs").is_dir(), reason="no mergekit fixtures")


def ulp(x: torch.Tensor, mantissa: int) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=1e-30))) - mantissa)


@pytest.mark.parametrize("input_set", SETS)
@pytest.mark.parametrize("config", list(CASES))
def test_geometric_merge_is_within_the_stated_bound_of_mergekit(tmp_path, config, input_set):
    text, compare = CASES[config]
    if compare == "bf16" and input_set == "f32-tied":
        compare = "bf16-compute"  # mergekit rounds the float32 inputs to bf16 first (`dtype: bfloat16`)
    recipe = tmp_path / "recipe.toml"
    models = (DATA / "models" / input_set).as_posix()
    recipe.write_text(text.replace("{M}", models) + '[card]\nlicense = "apache-2.0"\n')
    hubmerge.merge(recipe, output_dir=tmp_path / "out", quiet=True, stats=False, log=lambda _: None)
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(DATA / "outputs" / f"{config}__{input_set}" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        diff = (g.double() - w.double()).abs()
        largest = w.double().abs().max()
        if compare == "f32":
            assert float(diff.max()) <= 1e-6 * float(largest), (name, float(diff.max() / largest))
        elif compare == "bf16":
            assert bool((diff <= ulp(w.double(), 7)).all()), name
        else:
            assert float(diff.max()) <= 2 * float(ulp(largest, 7)), (
                name,
                float(diff.max() / ulp(largest, 7)),
            )
        assert math.isfinite(float(diff.max()))
