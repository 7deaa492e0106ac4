"""The compiled kernels (`hubmerge.kernels`, numba) equal the torch path they replace, bit for bit.

tests/test_fast_paths.py runs its selection and TIES oracles once per kernel mode; here: each kernel on
values the oracles do not reach (infinities, subnormals, NaN), when the kernels run at all, and a whole
TIES merge of bf16 checkpoints whose shards are the same bytes with and without them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import hubmerge
from hubmerge import kernels
from hubmerge.methods import METHODS, Slice
from hubmerge.methods._gta import magnitudes

PARAMS = {"scaling_factor": 0.8, "merge_func": "sum", "threshold": 20.0, "trim": "global"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _adversarial(n: int = 100_000, seed: int = 5) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A float32 base (bf16 values) and three bf16 models: heavy ties, ±0, ±inf, subnormals, huge values."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    models = []
    for _ in range(3):
        step = torch.randint(-2, 3, (n,), generator=g).float() * base.float().abs() * 2**-7
        models.append((base.float() + step).to(torch.bfloat16))  # a few ulps away: many equal |τ|
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, float("inf"), float("-inf")])
    for i, m in enumerate(models):
        m[: special.numel()] = special.roll(i).to(torch.bfloat16)
        m[100:200] = m[100:200] if i < 2 else (-models[0][100:200].float()).to(torch.bfloat16)
    base[: special.numel()] = special.roll(3).to(torch.bfloat16)
    base[: special.numel()][base[: special.numel()].isinf()] = 0.0  # an infinite base has no finite τ
    return base.float(), tuple(models)


def _slice(base: torch.Tensor, models: tuple[torch.Tensor, ...]) -> Slice:
    return Slice("t", tuple(base.shape), 0, base, models, PARAMS, tuple({} for _ in models))  # type: ignore[arg-type]


def test_magnitudes_equal_torch_on_every_kind_of_value(monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _adversarial()
    monkeypatch.setenv("HUBMERGE_KERNELS", "torch")
    want = magnitudes(_slice(base, models), {})
    monkeypatch.setenv("HUBMERGE_KERNELS", "numba")
    got = kernels.magnitudes(base, models)
    assert got is not None and torch.equal(_bits(got), _bits(want))
    assert bool(want.isinf().any())  # the infinities were there


def test_bracket_counts_equal_torch_bincount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBMERGE_KERNELS", "numba")
    base, models = _adversarial()
    chunk = kernels.magnitudes(base, models)
    assert chunk is not None
    bits = _bits(chunk)
    bounds = {0: (int(bits[0].median()), int(bits[0].median()) + 70_000), 2: (1, int(bits[2].median()))}
    counts = {i: torch.zeros(hi - lo + 2, dtype=torch.int64) for i, (lo, hi) in bounds.items()}
    assert kernels.bracket_counts(chunk, bounds, counts)
    for i, (lo, hi) in bounds.items():
        want = torch.bincount((bits[i].long() - (lo - 1)).clamp(0, hi - lo + 1), minlength=hi - lo + 2)
        assert torch.equal(counts[i], want)
        assert int(counts[i][0]) and int(counts[i][-1]) and int(counts[i][1:-1].sum())  # all three parts


@pytest.mark.parametrize("cut_at", ["quantile", "zero"])
def test_ties_sum_equals_the_torch_merge_step(monkeypatch: pytest.MonkeyPatch, cut_at: str) -> None:
    base, models = _adversarial()
    finite = [((m.float() - base).abs()) for m in models]
    finite = [f[f.isfinite()] for f in finite]
    cuts = [float(f.quantile(0.8)) if cut_at == "quantile" else 0.0 for f in finite]
    results = {}
    for mode in ("torch", "numba"):
        monkeypatch.setenv("HUBMERGE_KERNELS", mode)
        results[mode] = METHODS["ties"].merge(_slice(base, models), {"cut": cuts})
    want, got = results["torch"], results["numba"]
    assert torch.equal(_bits(got.values), _bits(want.values))
    assert torch.equal(got.positions, want.positions) and want.positions.numel() > 0
    assert got.tally == want.tally
    for a, b in ((got.alternatives[0], want.alternatives[0]), (got.alternatives[1], want.alternatives[1])):
        assert torch.equal(_bits(a), _bits(b))


def test_a_nan_total_leaves_the_piece_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # +inf and -inf task vectors at one position: their sum is NaN, whose sign only torch's path decides.
    monkeypatch.setenv("HUBMERGE_KERNELS", "numba")
    base = torch.zeros(1000)
    models = tuple(torch.zeros(1000, dtype=torch.bfloat16) for _ in range(3))
    models[0][7], models[1][7] = float("inf"), float("-inf")
    assert kernels.ties_sum(base, models, [0.0] * 3, 0.8) is None
    assert kernels.ties_sum(base, (models[2],) * 3, [0.0] * 3, 0.8) is not None


def test_when_the_kernels_run(monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _adversarial(1000)
    monkeypatch.setenv("HUBMERGE_KERNELS", "auto")
    assert kernels.magnitudes(base, models) is None  # a small piece stays in torch
    assert kernels.enabled(1 << 20)
    monkeypatch.setenv("HUBMERGE_KERNELS", "numba")
    assert kernels.magnitudes(base, models) is not None
    assert kernels.magnitudes(base.double(), models) is None  # float64 base: torch
    assert kernels.magnitudes(base, tuple(m.half() for m in models)) is None  # not bf16: torch
    monkeypatch.setenv("HUBMERGE_KERNELS", "torch")
    assert not kernels.enabled(1 << 30)


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_a_ties_merge_writes_the_same_bytes_with_and_without_kernels(
    make_model: Callable[..., Path],
    write_recipe: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, seed in (("base", 0), ("math", 1), ("code", 2), ("instruct", 3)):
        make_model(name, seed, dtype=torch.bfloat16, shards=2)
    written = {}
    for mode in ("torch", "numba"):
        monkeypatch.setenv("HUBMERGE_KERNELS", mode)
        recipe = write_recipe(
            'method = "ties"\nbase = "models/base"\nmodels = ["models/math", "models/code", "models/instruct"]\n'
            f'[parameters]\nscaling_factor = 0.8\nthreshold = 20\n[output]\ndir = "out-{mode}"\n',
            f"{mode}.toml",
        )
        result = hubmerge.merge(recipe, push=False, quiet=True, log=lambda _: None)
        written[mode] = _sha256s(result.output_dir)
    assert written["torch"] and written["torch"] == written["numba"]
