"""The geometric methods (slerp, nuslerp, multislerp, karcher, model_stock) end to end, against references.

The references are mergekit 0.1.5's algorithms written out plainly on whole tensors, in float32 as mergekit
computes them (and in float64, to show which side the difference comes from). hubmerge cannot repeat
torch's float32 summation order over a whole tensor while it streams slices, so it gathers the inner
products in float64 instead; the bound tested is

- float32 output: max |hubmerge − reference| ≤ 1e-6 × max |reference| per tensor (8 to 16 ulp of the
  tensor's largest value; against mergekit's own outputs hubmerge measures 1 to 5, see
  test_mergekit_parity_geometric.py);
- bf16 output: every element within one bf16 ulp of the float32 reference.

Every merge also runs with slices forced down to 7 elements (a 2-D tensor a row per slice, a 1-D one in
five slices), whose bytes must equal the default slices' bytes: the float64 sums do not depend on how a
tensor is cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.reference import load_f32, with_head

import hubmerge
from hubmerge.errors import HubmergeError, RecipeError
from hubmerge.merging import plan as plan_module
from hubmerge.merging.methods import sphere
from hubmerge.merging.report import plan_json, plan_text

StateDict = dict[str, torch.Tensor]
VOCAB = 64  # short embeddings keep the 7-element slice runs fast; they still span 64 slices
LAYERS = 4  # a gradient over 4 layers lands between anchors (t = 1/3, 2/3)
T_FILTERS = (
    't = [{filter = "self_attn", value = [0, 0.5, 0.3, 0.7, 1]}, '
    '{filter = "mlp", value = [1, 0.5, 0.7, 0.3, 0]}, {value = 0.5}]'
)


# --- inputs ----------------------------------------------------------------------------------------------


def family(tmp_path: Path, dtype: torch.dtype, head: bool) -> tuple[StateDict, list[StateDict]]:
    """A base and three fine-tunes of it, written as checkpoints (`models/base`, `models/m0` …) and read back.

    m0 moves every weight by N(0, 0.01); m1 by N(0, 0.02) but leaves the norms exactly unchanged (zero
    task vectors on 1-D tensors); m2 by N(0, 0.005) plus a drift of 0.003 on the MLP.
    """
    base = random_state_dict(0, vocab=VOCAB, head=head, layers=LAYERS)
    g = torch.Generator().manual_seed(1)
    fine_tunes = []
    for i, scale in enumerate((0.01, 0.02, 0.005)):
        sd = {}
        for k, v in base.items():
            delta = torch.randn(v.shape, generator=g) * scale
            if i == 1 and k.endswith("norm.weight"):
                delta.zero_()
            if i == 2 and ".mlp." in k:
                delta += 0.003
            sd[k] = v + delta
        fine_tunes.append(sd)
    folders = [
        write_checkpoint(tmp_path / "models" / name, sd, dtype=dtype, num_hidden_layers=LAYERS)
        for name, sd in zip(("base", "m0", "m1", "m2"), (base, *fine_tunes))
    ]
    loaded = [with_head(load_f32(f)) if head else load_f32(f) for f in folders]
    return loaded[0], loaded[1:]


def merge(tmp_path: Path, recipe: str, name: str = "out") -> StateDict:
    path = tmp_path / f"{name}.toml"
    path.write_text(recipe)
    hubmerge.merge(path, output_dir=tmp_path / name, quiet=True, stats=False, log=lambda _: None)
    return load_f32(tmp_path / name)


def merge_small_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str) -> StateDict:
    """The merge with default slices, then with 7-element slices: the same bytes both times."""
    got = merge(tmp_path, recipe, "out-default")
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 7)
    merge(tmp_path, recipe, "out-7")
    for file in sorted((tmp_path / "out-default").glob("model*.safetensors")):
        assert file.read_bytes() == (tmp_path / "out-7" / file.name).read_bytes(), file.name
    return got


def assert_matches(got: StateDict, want: StateDict, dtype: torch.dtype, rel: float = 1e-6) -> None:
    """The bound of the module docstring: `want` is a float32 (or float64) whole-tensor reference."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        w = w.double()
        g = got[k].double()
        assert g.shape == w.shape, k
        assert torch.isfinite(g).all(), k
        slack = rel * float(w.abs().max())
        if dtype == torch.float32:
            assert float((g - w).abs().max()) <= slack, (k, float((g - w).abs().max()), slack)
        else:
            ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp(min=1e-30))) - 7)
            assert bool(((g - w).abs() <= ulp + slack).all()), (k, float(((g - w).abs() / ulp).max()))


# --- references: mergekit 0.1.5's algorithms on whole tensors ----------------------------------------------


def layer_t(name: str, values: list[float]) -> float:
    """A gradient's value for tensor `name` (mergekit: layer i of n at i/(n−1), other tensors at 0)."""
    position = 0.0
    if ".layers." in name:
        position = int(name.split(".layers.")[1].split(".")[0]) / (LAYERS - 1)
    x = position * (len(values) - 1)
    low = min(math.floor(x), len(values) - 2)
    return values[low] + (x - low) * (values[low + 1] - values[low])


def slerp_t(name: str) -> float:
    if "self_attn" in name:
        return layer_t(name, [0, 0.5, 0.3, 0.7, 1])
    if "mlp" in name:
        return layer_t(name, [1, 0.5, 0.7, 0.3, 0])
    return 0.5


def ref_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a, b = v0.to(dtype).flatten(), v1.to(dtype).flatten()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na, nb = (n if n > 1e-8 else torch.ones_like(n) for n in (na, nb))
    cos = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=dtype)
    if cos.abs() > 0.9995:
        ca, cb = 1 - tt, tt
    else:
        omega = torch.acos(cos)
        ca, cb = torch.sin((1 - tt) * omega) / torch.sin(omega), torch.sin(tt * omega) / torch.sin(omega)
    return (ca * a + cb * b).view(v0.shape)


def ref_nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """`mode`: one angle for the whole tensor ("tensor"), per last-dim vector ("row"), per column."""
    shape = v0.shape
    if mode == "tensor" or v0.dim() == 1:
        view = lambda x: x.reshape(1, -1)  # noqa: E731
    elif mode == "row":
        view = lambda x: x.reshape(-1, shape[-1])  # noqa: E731
    else:
        view = lambda x: x.reshape(shape[0], -1).T  # noqa: E731
    a, b = view(v0.to(dtype)), view(v1.to(dtype))
    ua = a / torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=1, keepdim=True).clamp(-1, 1)
    collinear = 1 - cos**2 <= 1e-16
    omega = torch.acos(torch.where(collinear, 0, cos))
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    out = torch.where(collinear, (1 - t) * a + t * b, out)
    return (out.T if mode == "column" and v0.dim() > 1 else out).reshape(shape)


def ref_multislerp(
    xs: list[torch.Tensor],
    weights: list[float],
    dtype: torch.dtype,
    normalize: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    x = torch.stack([v.to(dtype).flatten() for v in xs])
    w = torch.tensor(weights, dtype=dtype)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    u = x / (norms + eps)
    mean = (w[:, None] * u).sum(0)
    mean = mean / torch.linalg.vector_norm(mean)
    tangent = (w[:, None] * (u - (u @ mean)[:, None] * mean)).sum(0)
    tn = torch.linalg.vector_norm(tangent) + eps
    out = (torch.cos(tn) * mean + torch.sin(tn) / tn * tangent) * (norms[:, 0] * w).sum()
    return out.view(xs[0].shape)


def ref_karcher(
    xs: list[torch.Tensor], dtype: torch.dtype, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    x = [v.to(dtype).flatten() for v in xs]
    norms = [torch.linalg.vector_norm(v) for v in x]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    units = [x[i] / norms[i] for i in valid]
    beta = 1 / len(valid)
    m = sum(beta * u for u in units)
    m = units[0].clone() if torch.linalg.vector_norm(m) < tol else m / torch.linalg.vector_norm(m)
    for _ in range(max_iter):
        tangent = torch.zeros_like(m)
        for u in units:
            cos = torch.dot(m, u).clamp(-1, 1)
            omega = torch.arccos(cos)
            if omega >= tol:
                tangent += beta * omega / torch.sin(omega) * (u - cos * m)
        tn = torch.linalg.vector_norm(tangent)
        if tn < tol:
            break
        m = torch.cos(tn) * m + torch.sin(tn) * tangent / tn
        if torch.linalg.vector_norm(m) > tol:
            m = m / torch.linalg.vector_norm(m)
    return (sum(norms) / len(xs) * m).view(xs[0].shape)


def ref_model_stock(
    base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool, dtype: torch.dtype
) -> torch.Tensor:
    shape = base.shape
    view = (
        (lambda v: v.reshape(-1, shape[-1]))
        if filter_wise and base.dim() > 1
        else (lambda v: v.reshape(1, -1))
    )
    b = view(base.to(dtype))
    ms = [view(m.to(dtype)) for m in models]
    tv = [m - b for m in ms]
    n = len(ms)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = torch.linalg.vector_norm(tv[i], dim=1) * torch.linalg.vector_norm(tv[j], dim=1)
            cos.append(((tv[i] * tv[j]).sum(dim=1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0)[:, None]
    denominator = 1 + (n - 1) * c
    t = torch.where(denominator.abs() < 1e-6, 0, n * c / denominator)
    return (t * (sum(ms) / n) + (1 - t) * b).reshape(shape)


# --- recipes ---------------------------------------------------------------------------------------------


def recipe(method: str, base: bool, models: list[tuple[str, float | None]], params: str = "") -> str:
    text = f'method = "{method}"\n' + ('base = "models/base"\n' if base else "")
    if params:
        text += f"[parameters]\n{params}\n"
    for name, weight in models:
        text += f'[[models]]\nsource = "models/{name}"\n' + (
            f"weight = {weight}\n" if weight is not None else ""
        )
    return text


DTYPES = [torch.float32, torch.bfloat16]
IDS = ["f32", "bf16"]


def layouts(small: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """float32 inputs with a tied head and bf16 inputs with an untied one; the layout named by `small`
    also merges with 7-element slices (each method gets them on one layout: they cost seconds)."""
    return pytest.mark.parametrize(
        ("dtype", "head", "small"),
        [(torch.float32, False, small == "f32-tied"), (torch.bfloat16, True, small == "bf16-untied")],
        ids=["f32-tied", "bf16-untied"],
    )


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, small: bool) -> StateDict:
    return merge_small_slices(tmp_path, monkeypatch, text) if small else merge(tmp_path, text)


def test_gram_in_blocks_is_the_float64_inner_products_per_tensor_row_and_column(monkeypatch):
    monkeypatch.setattr(sphere, "_BLOCK", 5)  # 7-element rows: one row per block, the tensor in 9 blocks
    g = torch.Generator().manual_seed(3)
    vectors = [torch.randn(6, 7, generator=g) for _ in range(3)]
    x = torch.stack([v.double() for v in vectors])
    want = {
        "tensor": x.flatten(1) @ x.flatten(1).T,
        "vector": torch.einsum("irc,jrc->rij", x, x),
        "column": torch.einsum("irc,jrc->cij", x, x),
    }
    for scope, expected in want.items():
        got = sphere.gram(vectors, (6, 7), scope)  # type: ignore[arg-type]
        assert got.dtype == torch.float64 and got.shape == expected.shape, scope
        assert torch.allclose(got, expected, rtol=1e-12, atol=0), scope


# --- slerp -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@layouts(small="bf16-untied")
def test_slerp_with_gradient_filters_matches_whole_tensor_reference(
    tmp_path, monkeypatch, dtype, head, small
):
    base, models = family(tmp_path, dtype, head)
    got = run(tmp_path, monkeypatch, recipe("slerp", True, [("m0", None)], T_FILTERS), small)
    want = {k: ref_slerp(slerp_t(k), base[k], models[0][k], torch.float32) for k in base}
    assert_matches(got, want, dtype)


@pytest.mark.slow
def test_slerp_gradient_t_0_half_1_spreads_over_layers(tmp_path):
    base, models = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("slerp", True, [("m0", None)], "t = [0, 0.5, 1]"))
    want = {k: ref_slerp(layer_t(k, [0, 0.5, 1]), base[k], models[0][k], torch.float32) for k in base}
    assert_matches(got, want, torch.float32)
    # t = 0 on the embedding and layer 0 gives the base, t = 1 on the last layer gives the model.
    q = "self_attn.q_proj.weight"
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(got[f"model.layers.0.{q}"], base[f"model.layers.0.{q}"])
    assert torch.allclose(got[f"model.layers.3.{q}"], models[0][f"model.layers.3.{q}"], rtol=0, atol=1e-7)


def test_slerp_of_identical_models_takes_the_lerp_branch(tmp_path):
    base, _ = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("slerp", True, [("base", None)], "t = 0.3"))
    # cos Ω = 1 > 0.9995: 0.7·θ + 0.3·θ, never sin 0 / sin 0.
    for k, v in base.items():
        assert torch.allclose(got[k], v, rtol=0, atol=2e-7), k


def test_slerp_of_antiparallel_tensors_takes_the_lerp_branch(tmp_path):
    base = random_state_dict(0, vocab=VOCAB)
    write_checkpoint(tmp_path / "models" / "base", base, dtype=torch.float32)
    write_checkpoint(tmp_path / "models" / "neg", {k: -v for k, v in base.items()}, dtype=torch.float32)
    got = merge(tmp_path, recipe("slerp", True, [("neg", None)], "t = 0.25"))
    for k, v in base.items():  # 0.75·θ − 0.25·θ
        assert torch.allclose(got[k], 0.5 * v, rtol=0, atol=1e-7), k


# --- nuslerp ---------------------------------------------------------------------------------------------

NUSLERP_MODES = {
    "tensor": "",
    "row": "nuslerp_flatten = false",
    "column": "nuslerp_flatten = false\nnuslerp_row_wise = true",
}


@pytest.mark.slow
@layouts(small="f32-tied")
@pytest.mark.parametrize("mode", list(NUSLERP_MODES))
def test_nuslerp_with_base_matches_whole_tensor_reference(tmp_path, monkeypatch, dtype, head, small, mode):
    base, models = family(tmp_path, dtype, head)
    text = recipe("nuslerp", True, [("m0", 0.3), ("m1", 0.7)], NUSLERP_MODES[mode])
    got = run(tmp_path, monkeypatch, text, small)
    want = {
        k: base[k] + ref_nuslerp(0.7, models[0][k] - base[k], models[1][k] - base[k], mode, torch.float32)
        for k in base
    }
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_nuslerp_without_base_interpolates_the_models(tmp_path, dtype):
    _, models = family(tmp_path, dtype, False)
    got = merge(tmp_path, recipe("nuslerp", False, [("m0", 1.0), ("m2", 3.0)]))
    want = {k: ref_nuslerp(0.75, models[0][k], models[2][k], "tensor", torch.float32) for k in models[0]}
    assert_matches(got, want, dtype)


def test_nuslerp_zero_weights_and_zero_task_vectors_give_no_nan(tmp_path):
    base, models = family(tmp_path, torch.float32, False)
    # w₁ + w₂ = 0: t = 0.5. m1's norms are unchanged: a zero task vector, cos = 0, no division by 0.
    got = merge(tmp_path, recipe("nuslerp", True, [("m0", 1.0), ("m1", -1.0)]))
    want = {
        k: base[k] + ref_nuslerp(0.5, models[0][k] - base[k], models[1][k] - base[k], "tensor", torch.float32)
        for k in base
    }
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("mode", list(NUSLERP_MODES))
def test_nuslerp_of_identical_task_vectors_takes_the_collinear_branch(tmp_path, mode):
    _, models = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("nuslerp", True, [("m0", 0.3), ("m0", 0.7)], NUSLERP_MODES[mode]))
    # cos Ω = 1: (1 − t)·τ + t·τ, never sin 0 / sin 0.
    for k, v in models[0].items():
        assert torch.allclose(got[k], v, rtol=0, atol=1e-6), k


def test_nuslerp_per_row_reads_only_1d_tensors_twice(tmp_path, monkeypatch):
    """Rows are whole in a slice: the pass runs only on 1-D tensors (one vector across slices)."""
    family(tmp_path, torch.float32, False)
    seen: list[tuple[int, ...]] = []
    gram = sphere.gram

    def spy(vectors, shape, scope):  # type: ignore[no-untyped-def]
        seen.append(shape)
        return gram(vectors, shape, scope)

    monkeypatch.setattr(sphere, "gram", spy)
    merge(tmp_path, recipe("nuslerp", True, [("m0", 0.3), ("m1", 0.7)], NUSLERP_MODES["row"]))
    assert seen and all(len(shape) == 1 for shape in seen)


def test_the_plan_says_which_tensors_a_per_row_pass_reads(tmp_path):
    family(tmp_path, torch.float32, False)
    path = tmp_path / "rows.toml"
    path.write_text(recipe("nuslerp", True, [("m0", 0.3), ("m1", 0.7)], NUSLERP_MODES["row"]))
    plan = hubmerge.load_plan(path)
    vectors = sum(1 for t in plan.tensors if len(t.shape) == 1)
    assert 0 < vectors < len(plan.tensors)
    assert plan_json(plan)["passes"] == [
        {"name": "gram", "kind": "reduce", "scope": "tensor", "tensors": vectors}
    ]
    assert f"{vectors} of {len(plan.tensors)} tensors): every input is read at most 2 times" in plan_text(
        plan
    )


# --- multislerp ------------------------------------------------------------------------------------------


@pytest.mark.slow
@layouts(small="bf16-untied")
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_multislerp_matches_whole_tensor_reference(tmp_path, monkeypatch, dtype, head, small, with_base):
    base, models = family(tmp_path, dtype, head)
    weights = [0.5, 0.3, 0.2] if with_base else [1.0, 1.0, 2.0]
    text = recipe("multislerp", with_base, list(zip(("m0", "m1", "m2"), weights, strict=True)))
    got = run(tmp_path, monkeypatch, text, small)
    for reference_dtype in (torch.float32, torch.float64):
        want = {}
        for k in base:
            xs = [m[k] - base[k] if with_base else m[k] for m in models]
            want[k] = ref_multislerp(xs, weights, reference_dtype) + (base[k] if with_base else 0)
        assert_matches(got, want, dtype)


def test_multislerp_without_normalized_weights(tmp_path):
    base, models = family(tmp_path, torch.float32, False)
    got = merge(
        tmp_path, recipe("multislerp", True, [("m0", 0.5), ("m2", 0.25)], "normalize_weights = false")
    )
    want = {
        k: base[k]
        + ref_multislerp([models[0][k] - base[k], models[2][k] - base[k]], [0.5, 0.25], torch.float32, False)
        for k in base
    }
    assert_matches(got, want, torch.float32)


def test_multislerp_of_identical_models_returns_the_model(tmp_path):
    base, _ = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("multislerp", False, [("base", 1.0), ("base", 2.0)]))
    for k, v in base.items():
        assert torch.allclose(got[k], v, rtol=1e-6, atol=1e-7), k


def test_multislerp_of_one_model_returns_it_without_the_base(tmp_path):
    _, models = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("multislerp", True, [("m2", 0.5)]))
    assert all(torch.equal(got[k], v) for k, v in models[2].items())


def test_multislerp_all_zero_task_vectors_fall_back_for_two_and_fail_for_three(tmp_path):
    base, _ = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("multislerp", True, [("base", 1.0), ("base", 1.0)]))
    for k, v in base.items():  # μ = 0 < ε: the weighted sum of the (zero) task vectors, plus the base
        assert torch.equal(got[k], v), k
    with pytest.raises(HubmergeError, match="cancel out"):
        merge(tmp_path, recipe("multislerp", True, [("base", 1.0)] * 3), "out3")


# --- karcher ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@layouts(small="f32-tied")
def test_karcher_gram_iteration_matches_whole_tensor_iteration(tmp_path, monkeypatch, dtype, head, small):
    _, models = family(tmp_path, dtype, head)
    text = recipe("karcher", False, [(m, None) for m in ("m0", "m1", "m2")], "max_iter = 10\ntol = 1e-5")
    got = run(tmp_path, monkeypatch, text, small)
    # Tighter against the float64 iteration: the difference from float32 is mergekit's rounding.
    for reference_dtype, rel in ((torch.float32, 1e-6), (torch.float64, 3e-7)):
        want = {k: ref_karcher([m[k] for m in models], reference_dtype) for k in models[0]}
        assert_matches(got, want, dtype, rel)


def test_karcher_one_iteration_and_zero_inputs(tmp_path):
    base, models = family(tmp_path, torch.float32, False)
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    write_checkpoint(tmp_path / "models" / "zero", zero, dtype=torch.float32, num_hidden_layers=LAYERS)
    text = recipe("karcher", False, [("m0", None), ("zero", None), ("m2", None)], "max_iter = 1")
    got = merge(tmp_path, text)
    # A zero input is not a direction: the mean is over m0 and m2, scaled by (‖m0‖ + 0 + ‖m2‖)/3.
    want = {k: ref_karcher([models[0][k], zero[k], models[2][k]], torch.float32, max_iter=1) for k in base}
    assert_matches(got, want, torch.float32)
    got = merge(tmp_path, recipe("karcher", False, [("zero", None), ("zero", None)]), "out-zero")
    assert all(torch.equal(v, torch.zeros_like(v)) for v in got.values())


def test_karcher_of_identical_models_returns_the_model(tmp_path):
    base, _ = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("karcher", False, [("base", None), ("base", None)]))
    for k, v in base.items():
        assert torch.allclose(got[k], v, rtol=1e-6, atol=1e-7), k


# --- model_stock -----------------------------------------------------------------------------------------


@pytest.mark.slow
@layouts(small="bf16-untied")
@pytest.mark.parametrize("filter_wise", [False, True], ids=["tensor", "filter_wise"])
def test_model_stock_matches_whole_tensor_reference(tmp_path, monkeypatch, dtype, head, small, filter_wise):
    base, models = family(tmp_path, dtype, head)
    text = recipe(
        "model_stock",
        True,
        [(m, None) for m in ("m0", "m1", "m2")],
        "filter_wise = true" if filter_wise else "",
    )
    got = run(tmp_path, monkeypatch, text, small)
    want = {k: ref_model_stock(base[k], [m[k] for m in models], filter_wise, torch.float32) for k in base}
    assert_matches(got, want, dtype)


def test_model_stock_with_zero_task_vectors_keeps_the_base(tmp_path):
    base, _ = family(tmp_path, torch.float32, False)
    got = merge(tmp_path, recipe("model_stock", True, [("base", None), ("base", None)]))
    for k, v in base.items():  # cos φ = 0 (norms clamped to 1e-6): t = 0
        assert torch.equal(got[k], v), k


# --- input contracts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (recipe("slerp", True, [("m0", None), ("m1", None)], "t = 0.5"), "exactly 1 model"),
        (recipe("slerp", True, [("m0", None)]), "parameters.t"),
        (recipe("slerp", False, [("m0", None)], "t = 0.5"), "base"),
        (recipe("nuslerp", True, [("m0", 1.0), ("m1", 1.0), ("m2", 1.0)]), "exactly 2 models"),
        (recipe("nuslerp", True, [("m0", 1.0), ("m1", None)]), r"models\[1\].weight"),
        (recipe("model_stock", True, [("m0", None)]), "2 or more models"),
        (recipe("model_stock", False, [("m0", None), ("m1", None)]), "base"),
        (recipe("nuslerp", True, [("m0", 1.0), ("m1", 1.0)], "nuslerp_flatten = [true, false]"), "one value"),
    ],
    ids=[
        "slerp-two-models",
        "slerp-no-t",
        "slerp-no-base",
        "nuslerp-three",
        "nuslerp-no-weight",
        "model_stock-one",
        "model_stock-no-base",
        "nuslerp-flatten-gradient",
    ],
)
def test_recipes_outside_the_input_contract_are_refused(tmp_path, text, message):
    family(tmp_path, torch.float32, False)
    with pytest.raises(RecipeError, match=message):
        merge(tmp_path, text)
