"""Reference formulas written independently of the engine (FusionBench's algorithms in float32 on whole
state dicts, mergekit's `linear`), the pools the method tests merge, and the comparisons they make."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from support.checkpoints import random_state_dict, write_checkpoint

StateDict = dict[str, torch.Tensor]

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def load_f32(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors |= {k: v.float() for k, v in load_file(file).items()}
    return tensors


def with_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tied model's head reads as its embedding."""
    return sd if HEAD in sd else {**sd, HEAD: sd[EMBED]}


# --- reference formulas ----------------------------------------------------------------------------------


def ref_simple_average(models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([m[k] for m in models]).sum(0) / len(models) for k in models[0]}


def ref_linear(models: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """mergekit's linear: float32 weights, one fused multiply-add per model, divided by their float32 sum."""
    w = torch.tensor(weights, dtype=torch.float32)
    out = {}
    for k in models[0]:
        acc = torch.zeros_like(models[0][k], dtype=torch.float32)
        for weight, m in zip(w, models):
            acc.addcmul_(m[k].float(), weight)
        out[k] = acc / w.sum()
    return out


def ref_task_arithmetic(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    lam: float,
    weights: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    weights = weights or [1.0] * len(models)
    return {k: base[k] + lam * sum(w * (m[k] - base[k]) for w, m in zip(weights, models)) for k in base}


def ref_ties(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    lam: float,
    k_pct: float = 20,
    merge_func: str = "sum",
) -> dict[str, torch.Tensor]:
    keys = sorted(base)
    flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in keys])  # noqa: E731
    pt = flat(base)
    tv = torch.vstack([flat(m) for m in models]) - pt
    d = tv.shape[1]
    frac = k_pct / 100 if k_pct > 1 else k_pct
    k = d - int(d * frac)
    if k >= 1:  # FusionBench crashes on k = 0 (threshold 100); keeping everything is what it means
        tv = tv * (tv.abs() >= tv.abs().kthvalue(k, dim=1, keepdim=True).values)
    sign = torch.sign(tv.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    sel = tv * torch.where(sign > 0, tv > 0, tv < 0)
    if merge_func == "sum":
        agg = sel.sum(0)
    elif merge_func == "mean":
        agg = sel.sum(0) / (sel != 0).sum(0).float().clamp(min=1)
    else:
        agg = sel.abs().max(0)[0] * sign
    out, res, i = pt + lam * agg, {}, 0
    for k in keys:
        n = base[k].numel()
        res[k] = out[i : i + n].view_as(base[k])
        i += n
    return res


def ref_ties_per_tensor(
    base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], lam: float
) -> dict[str, torch.Tensor]:
    # Per-tensor trimming, still with the model-wide majority sign for exact zeros.
    trimmed = {}
    for k in base:
        tv = torch.stack([m[k].reshape(-1) - base[k].reshape(-1) for m in models])
        d = tv.shape[1]
        kth = tv.abs().kthvalue(d - int(d * 0.2), dim=1, keepdim=True).values
        trimmed[k] = tv * (tv.abs() >= kth)
    signs = {k: torch.sign(tv.sum(0)) for k, tv in trimmed.items()}
    majority = torch.sign(sum(s.sum() for s in signs.values()))
    res = {}
    for k, tv in trimmed.items():
        sign = signs[k].clone()
        sign[sign == 0] = majority
        agg = (tv * torch.where(sign > 0, tv > 0, tv < 0)).sum(0)
        res[k] = (base[k].reshape(-1) + lam * agg).view_as(base[k])
    return res


# --- helpers -----------------------------------------------------------------------------------------------


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        expected = want[k].to(dtype).float()
        assert got[k].shape == expected.shape, k
        # One rounding of the same float32 value: bit-identical for bf16, within 1e-6 for float32.
        assert torch.allclose(got[k], expected, rtol=0, atol=1e-6), (k, (got[k] - expected).abs().max())


# Narrower tiny models for the tests that merge in slices of a few elements, where every slice is a read and
# a write: hidden 16 and intermediate 32 instead of 32 and 64 (random_state_dict's arguments, and the config
# keys that go with them).
NARROW = {"hidden": 16, "intermediate": 32}
NARROW_CONFIG = {"hidden_size": 16, "intermediate_size": 32}


def narrow_model(folder: Path, seed: int, vocab: int, head: bool = False, **options: object) -> Path:
    """A NARROW checkpoint written as `write_checkpoint` writes one (`options`: dtype, shards)."""
    state_dict = random_state_dict(seed, vocab=vocab, head=head, **NARROW)
    return write_checkpoint(folder, state_dict, **options, **NARROW_CONFIG)  # type: ignore[arg-type]


POOL = 'base = "models/base"\nmodels = ["models/math", "models/code", "models/instruct"]\n'


def cancelling_pool(
    tmp_path: Path, majority: int, dtype: torch.dtype, vocab: int = 64, narrow: bool = False
) -> tuple[StateDict, list[StateDict]]:
    """Two task vectors that cancel exactly at every third position of the model, in every tensor.

    Elsewhere both agree in sign, which decides the model-wide sign FusionBench gives the cancelled
    positions: all negative (majority -1), all positive (+1), or as many of each (0). `narrow`: the
    `NARROW` widths (a quarter of the elements).
    """
    g = torch.Generator().manual_seed(11)
    shape = NARROW if narrow else {}
    base = {k: torch.zeros_like(v) for k, v in random_state_dict(0, vocab=vocab, **shape).items()}
    names = sorted(base)
    total = sum(base[k].numel() for k in names)
    position = torch.arange(total)
    cancel = position % 3 == 1
    sign = torch.full((total,), float(majority)) if majority else torch.where(position % 3 == 0, 1.0, -1.0)
    if majority == 0:  # balance the signs exactly: the surplus of positive positions cancels too
        positive = (~cancel & (sign > 0)).nonzero().flatten()
        surplus = len(positive) - int((~cancel & (sign < 0)).sum())
        cancel[positive[len(positive) - surplus :]] = True
    magnitude = (torch.rand(total, generator=g) + 0.5).to(dtype).float()  # exact in either dtype
    flat_a, flat_b = magnitude * sign, torch.where(cancel, -magnitude * sign, magnitude * sign)
    a, b, i = {}, {}, 0
    for k in names:
        n = base[k].numel()
        a[k], b[k] = flat_a[i : i + n].view_as(base[k]), flat_b[i : i + n].view_as(base[k])
        i += n
    for name, sd in (("base", base), ("a", a), ("b", b)):
        write_checkpoint(tmp_path / "models" / name, sd, dtype=dtype, **(NARROW_CONFIG if narrow else {}))
    return base, [a, b]
