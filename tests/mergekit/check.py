"""Recompute mergekit's deterministic merges from the fixture inputs and compare with its outputs.

Run with hubmerge's dev venv (no mergekit import, no mergekit installed):

    /work/venv/bin/python tests/mergekit/check.py

For every deterministic run in manifest.json this prints two maximum absolute differences against
mergekit's output (in the output's dtype):
  f32  — the formula written straightforwardly in float32 from the inputs (after the config's `dtype` cast);
  mk   — the same formula in the dtype mergekit computes in (float32 for linear/slerp, the loaded
         input dtype for everything else), with mergekit's order of operations.
`mk` equal to 0 everywhere is the evidence for the semantics described in README.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODELS = REPO / "tests" / "data" / "mergekit" / "models"
N_LAYERS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}
Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------- parameters


def layer_t(tensor_name: str) -> float:
    """Gradient position: layer i of n gets i / (n - 1); embeddings, final norm and lm_head get 0."""
    if tensor_name.startswith("model.layers."):
        return int(tensor_name.split(".")[2]) / (N_LAYERS - 1)
    return 0.0


def setting_value(setting: object, tensor_name: str, t: float) -> object:
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            flt = cond.get("filter")
            if flt in (None, "*") or flt in tensor_name:
                return setting_value(cond["value"], tensor_name, t)
        return None
    if isinstance(setting, list):
        pos = t * (len(setting) - 1)
        lo = int(pos)
        hi = min(len(setting) - 1, lo + 1)
        return (1 - (pos - lo)) * setting[lo] + (pos - lo) * setting[hi]
    return setting


def param(spec: dict, model: str | None, key: str, tensor_name: str, default: object = None) -> object:
    """Per-model parameters first (the model's own entry), then the top-level `parameters`."""
    t = layer_t(tensor_name)
    scopes = []
    if model is not None:
        for entry in models_of(spec):
            if entry["model"] == model and entry.get("parameters"):
                scopes.append(entry["parameters"])
    scopes.append(spec.get("parameters") or {})
    for scope in scopes:
        if key in scope:
            value = setting_value(scope[key], tensor_name, t)
            if value is not None:
                return value
    return default


def models_of(spec: dict) -> list[dict]:
    if "models" in spec:
        return spec["models"]
    return [{"model": s["model"], "parameters": s.get("parameters")} for s in spec["slices"][0]["sources"]]


# ---------------------------------------------------------------- methods
# Each takes (spec, name, base tensor or None, [(model, tensor)] non-base inputs, compute dtype) and
# returns the merged tensor. `cd` is the dtype the arithmetic runs in.


def linear(spec, name, base, inputs, cd):
    ws = [float(param(spec, m, "weight", name)) for m, _ in inputs]
    acc = torch.zeros_like(inputs[0][1], dtype=cd)
    for (_, x), w in zip(inputs, ws):
        acc.addcmul_(x.to(cd), torch.tensor(w, dtype=cd))  # fused multiply-add, as mergekit accumulates
    if param(spec, None, "normalize", name, True):
        acc.div_(torch.tensor(ws, dtype=cd).sum())
    return acc


def top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * N) largest |delta| (at least 1). Ties fall where torch's default
    (unstable) CPU sort of the float32 magnitudes puts them."""
    if density >= 1:
        return torch.ones_like(delta)
    k = max(1, int(density * delta.numel()))
    order = torch.sort(delta.abs().reshape(-1).float(), descending=True).indices
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:k]] = 1
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: in ascending |delta| order, drop the int(gamma N) largest and the smallest so
    int(density N) remain."""
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    keep = int(density * n)
    lowest = max(0, n - keep - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[lowest : lowest + keep]] = 1
    return mask.reshape(delta.shape)


def task_vector_merge(sparsify: str | None, consensus: bool, normalize_default: bool):
    def merge(spec, name, base, inputs, cd):
        base = base.to(cd)
        deltas, weights = [], []
        for m, x in inputs:
            d = x.to(cd) - base
            density = float(param(spec, m, "density", name, 1.0))
            if sparsify == "magnitude":
                d = d * top_k_mask(d, density)
            elif sparsify == "outliers":
                d = d * outlier_mask(d, density, float(param(spec, m, "gamma", name, 0.01)))
            w = torch.tensor(float(param(spec, m, "weight", name)), dtype=cd)
            deltas.append(d * w)
            weights.append(w)
        stacked = torch.stack(deltas)
        wcol = torch.stack(weights).reshape(-1, *([1] * base.dim()))
        if consensus:
            elected = torch.where(stacked.sum(0) >= 0, 1, -1).to(cd)
            agree = (stacked.sign() == elected).to(cd)
            mixed = (stacked * agree).sum(0)
            divisor = (wcol * agree).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = stacked.sum(0)
            divisor = wcol.sum(0).expand_as(mixed).clone()
            divisor[divisor.abs() < 1e-8] = 1
        if param(spec, None, "normalize", name, normalize_default):
            mixed = mixed / divisor
        lam = float(param(spec, None, "lambda", name, 1.0))
        if lam != 1:
            mixed = mixed * lam
        return base + mixed

    return merge


def slerp_vectors(t: float, a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9995) -> torch.Tensor:
    """Whole-tensor slerp in float32 on the unnormalised tensors; lerp when |cos| > threshold."""
    a32, b32 = a.float().reshape(-1), b.float().reshape(-1)
    na, nb = a32.norm(), b32.norm()
    na = na if na > 1e-8 else torch.tensor(1.0)
    nb = nb if nb > 1e-8 else torch.tensor(1.0)
    cos = ((a32 / na) * (b32 / nb)).sum().clamp(-1, 1)
    if cos.abs() > threshold:
        out = (1 - t) * a32 + t * b32
    else:
        theta = torch.acos(cos)
        out = (
            torch.sin((1 - t) * theta) / torch.sin(theta) * a32
            + torch.sin(t * theta) / torch.sin(theta) * b32
        )
    return out.reshape(a.shape)


def slerp(spec, name, base, inputs, cd):
    t = float(param(spec, None, "t", name))
    return slerp_vectors(t, base, inputs[0][1])


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, along: int | None) -> torch.Tensor:
    """Slerp of the unit directions' angle applied to the raw vectors; `along` None = whole tensor,
    else per vector along that dim."""
    shape = v0.shape
    if along is None:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif along == 0:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    straight = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(straight, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(straight, (1 - t) * v0 + t * v1, out)
    if along == 0:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(spec, name, base, inputs, cd):
    (m0, x0), (m1, x1) = inputs
    w0, w1 = float(param(spec, m0, "weight", name)), float(param(spec, m1, "weight", name))
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    flatten = param(spec, None, "nuslerp_flatten", name, True)
    along = None if flatten else (0 if param(spec, None, "nuslerp_row_wise", name, False) else -1)
    x0, x1 = x0.to(cd), x1.to(cd)
    if base is None:
        return nuslerp_vectors(t, x0, x1, along)
    base = base.to(cd)
    return base + nuslerp_vectors(t, x0 - base, x1 - base, along)


def multislerp(spec, name, base, inputs, cd, eps: float = 1e-8):
    xs = torch.stack([x.to(cd) for _, x in inputs])
    if base is not None:
        xs = xs - base.to(cd)
    flat = xs.reshape(len(inputs), -1)
    w = torch.tensor([float(param(spec, m, "weight", name)) for m, _ in inputs], dtype=cd)
    if param(spec, None, "normalize_weights", name, True):
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.reshape(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w.reshape(-1, 1)).sum(0)
    length = step.norm() + eps
    out = (mean * torch.cos(length) + step * (torch.sin(length) / length)) * (norms.squeeze(-1) * w).sum()
    out = out.reshape(xs.shape[1:])
    return out if base is None else out + base.to(cd)


def karcher(spec, name, base, inputs, cd):
    max_iter = int(param(spec, None, "max_iter", name, 10))
    tol = float(param(spec, None, "tol", name, 1e-5))
    xs = [x.to(cd) for _, x in inputs]
    alpha = 1.0 / len(xs)
    norms = [x.float().norm() for x in xs]
    units = [(x / n).to(x.dtype) for x, n in zip(xs, norms)]  # no zero-norm inputs in the fixtures
    mean = torch.zeros_like(units[0])
    for u in units:
        mean += alpha * u
    mean = (mean / mean.float().norm()).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.dot(mean.flatten(), u.flatten()).clamp(-1, 1)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        size = tangent.float().norm()
        if size.item() < tol:
            break
        mean = (torch.cos(size) * mean + torch.sin(size) * (tangent / size)).to(mean.dtype)
        mean = (mean / mean.float().norm()).to(mean.dtype)
    return sum(alpha * n for n in norms) * mean


def model_stock(spec, name, base, inputs, cd):
    rows = bool(param(spec, None, "filter_wise", name, False))
    w0 = base.to(cd)
    ws = [x.to(cd) for _, x in inputs]
    shape = w0.shape
    if rows and w0.dim() == 1:
        w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    elif not rows:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    ds = [w - w0 for w in ws]
    cosines = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            denom = (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((ds[i] * ds[j]).sum(-1) / denom).clamp(-1, 1))
    c = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(c), n * c / denom)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def sce(spec, name, base, inputs, cd):
    topk = float(param(spec, None, "select_topk", name, 1.0))
    base = base.to(cd)
    tvs = torch.stack([x.to(cd) - base for _, x in inputs])
    if topk < 1:
        var = tvs.var(dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        keep = torch.zeros_like(var)
        keep.view(-1)[torch.topk(var.abs().view(-1), k=k).indices] = 1
        tvs = tvs * keep
    elected = torch.where(tvs.sum(0) >= 0, 1, -1).to(cd)
    agree = (tvs.sign() == elected).to(cd)
    energy = tvs.square().reshape(len(inputs), -1).mean(1)
    energy = energy / energy.sum().item()
    ew = energy.reshape(-1, *([1] * base.dim())) * agree
    return base + (tvs * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def nearswap(spec, name, base, inputs, cd):
    t = float(param(spec, None, "t", name))
    a, b = base.to(cd), inputs[0][1].to(cd)
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def passthrough(spec, name, base, inputs, cd):
    m, x = inputs[0]
    scale = param(spec, m, "scale", name)
    return x.to(cd) if scale is None else x.to(cd) * scale


# method -> (function, base role: "required" | "optional" | "ignored", computes in float32 regardless of inputs)
METHODS: dict[str, tuple[Callable, str, bool]] = {
    "linear": (linear, "ignored", True),
    "task_arithmetic": (task_vector_merge(None, False, False), "required", False),
    "ties": (task_vector_merge("magnitude", True, True), "required", False),
    "breadcrumbs": (task_vector_merge("outliers", False, False), "required", False),
    "breadcrumbs_ties": (task_vector_merge("outliers", True, False), "required", False),
    "slerp": (slerp, "required", True),
    "nuslerp": (nuslerp, "optional", False),
    "multislerp": (multislerp, "optional", False),
    "karcher": (karcher, "ignored", False),
    "model_stock": (model_stock, "required", False),
    "sce": (sce, "required", False),
    "nearswap": (nearswap, "required", False),
    "passthrough": (passthrough, "ignored", False),
}


# ---------------------------------------------------------------- driver


def load(set_name: str, model: str, dtype: torch.dtype | None) -> Tensors:
    tensors = load_file(MODELS / set_name / model / "model.safetensors")
    return {k: v.to(dtype) if dtype else v for k, v in tensors.items()}


def check_run(run: dict) -> tuple[float, float, int]:
    spec = yaml.safe_load((REPO / run["config"]).read_text())
    method, base_role, f32_kernel = METHODS[spec["merge_method"]]
    in_dtype = DTYPES[spec.get("dtype")]
    out = load_file(REPO / run["output"] / "model.safetensors")
    names = [e["model"] for e in models_of(spec)]
    base_name = spec.get("base_model")
    loaded = {m: load(run["input_set"], m, in_dtype) for m in {*names, *([base_name] if base_name else [])}}
    if base_role == "ignored":
        base_name = None
    non_base = [m for m in names if m != base_name]
    first = loaded[non_base[0]]
    assert set(out) == set(first), f"{run['name']}: tensor names differ from the inputs'"
    out_config = json.loads((REPO / run["output"] / "config.json").read_text())
    vocab_rows = None
    if spec.get("tokenizer_source"):
        vocab_rows = out["model.embed_tokens.weight"].shape[0]
    assert out_config["vocab_size"] == out["model.embed_tokens.weight"].shape[0], run["name"]
    worst_f32 = worst_mk = 0.0
    vocab_tensors = ("model.embed_tokens.weight", "lm_head.weight")
    for name, got in out.items():
        # An untied set stores lm_head; a tied set has none, and mergekit writes none either.
        rows = vocab_rows if name in vocab_tensors else None
        base = loaded[base_name][name][:rows] if base_name else None
        ins = [(m, loaded[m][name][:rows]) for m in non_base]
        loaded_dtype = ins[0][1].dtype
        mk_dtype = torch.float32 if f32_kernel else loaded_dtype
        exp_mk = method(spec, name, base, ins, mk_dtype).to(got.dtype)
        exp_f32 = method(
            spec,
            name,
            base.float() if base is not None else None,
            [(m, x.float()) for m, x in ins],
            torch.float32,
        ).to(got.dtype)
        worst_mk = max(worst_mk, (exp_mk.float() - got.float()).abs().max().item())
        worst_f32 = max(worst_f32, (exp_f32.float() - got.float()).abs().max().item())
    return worst_f32, worst_mk, len(out)


def main() -> int:
    manifest = json.loads((HERE / "manifest.json").read_text())
    bad = 0
    print(f"{'run':52s} {'tensors':>7s} {'f32 diff':>10s} {'mk diff':>10s}")
    for run in manifest["runs"]:
        if not run["deterministic"] or run["returncode"] != 0:
            continue
        f32, mk, n = check_run(run)
        flag = "" if mk == 0 else "  <- not bit-exact"
        bad += mk != 0
        print(f"{run['name']:52s} {n:7d} {f32:10.3g} {mk:10.3g}{flag}")
    print(f"{bad} runs not reproduced bit for bit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
