"""The diagnostics' compiled kernel (hubmerge/_kernels.c, through `hubmerge.quality.kernel`) against a
reference written here with numpy in float64 from the definitions in `hubmerge.quality.diagnostics`: counts
equal, the Gram matrix equal to float64 rounding. The end-to-end equality with the torch path, on merges and
`hubmerge inspect`, is in test_diagnostics_fused.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from support.checkpoints import TINY

from hubmerge import api
from hubmerge.merging.methods.base import trim_threshold
from hubmerge.quality import kernel


def reference(
    base: torch.Tensor, models: Sequence[torch.Tensor], shrink: Sequence[float] | None
) -> dict[str, object]:
    t = torch.stack([m.float() - base.float() for m in models])  # float32 τ, as torch.sub rounds it
    tau = t.numpy().astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf − inf in a product's sum: NaN, as expected
        out: dict[str, object] = {"gram": tau @ tau.T}  # each product exact in float64
    nan = np.isnan(tau).any(axis=0)
    conflict = (tau > 0).any(axis=0) & (tau < 0).any(axis=0) & ~nan
    out["conflict"] = int(conflict.sum())
    out["model_conflict"] = [int((conflict & (row != 0)).sum()) for row in tau]
    if shrink is not None:
        for row, lam in zip(t, shrink, strict=True):
            if lam >= 0:
                torch.hardshrink(row, lam, out=row)
        elected = torch.sum(t, dim=0).numpy()  # torch's own float32 sum, in torch's order
        up, down = elected > 0, elected < 0
        undecided = ~(up | down)
        trimmed = t.numpy()
        out["sign_sum"] = int(up.sum()) - int(down.sum())
        out["kept"] = [int(((r > 0) | (r < 0)).sum()) for r in trimmed]
        out["dropped"] = [int((((r > 0) & down) | ((r < 0) & up)).sum()) for r in trimmed]
        out["undecided_pos"] = [int(((r > 0) & undecided).sum()) for r in trimmed]
        out["undecided_neg"] = [int(((r < 0) & undecided).sum()) for r in trimmed]
        out["nan"] = [int(np.isnan(r).sum()) for r in trimmed]
    return out


def assert_matches(counts: kernel.Counts | None, expected: dict[str, object]) -> None:
    assert counts is not None
    # NaN and ±Inf must be where the reference has them (assert_allclose's equal_nan).
    np.testing.assert_allclose(counts.gram.numpy(), expected["gram"], rtol=1e-12, atol=0)
    assert counts.conflict == expected["conflict"]
    assert counts.model_conflict.tolist() == expected["model_conflict"]
    if "kept" in expected:
        assert counts.sign_sum == expected["sign_sum"]
        for field in ("kept", "dropped", "undecided_pos", "undecided_neg", "nan"):
            assert getattr(counts, field).tolist() == expected[field], field


def inputs(
    n: int, numel: int, seed: int, base_dtype: torch.dtype, model_dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Task vectors small next to the base, rounded to `model_dtype`: in bfloat16 many equal values, exact
    zeros and cancellations, as in real fine-tunes."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.02).to(base_dtype)
    models = [(base.float() + torch.randn(numel, generator=g) * 0.002).to(model_dtype) for _ in range(n)]
    if n > 1 and numel > 4:
        models[1][: numel // 4] = base[: numel // 4].to(model_dtype)  # τ = 0 there
    return base, models


def test_the_kernel_is_built() -> None:
    """`pip install` compiles it (setup.py); without it the diagnostics cost two to five times as much."""
    assert kernel.available(), (
        "hubmerge/_kernels.c was not built: install a C compiler, then `pip install -e .`"
    )


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000, 4099])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
)
def test_counts_and_gram_match_the_definitions(
    n: int, numel: int, dtypes: tuple[torch.dtype, torch.dtype]
) -> None:
    base, models = inputs(n, numel, seed=n * 1000 + numel, base_dtype=dtypes[0], model_dtype=dtypes[1])
    assert_matches(kernel.measure(base, models, None), reference(base, models, None))


@pytest.mark.parametrize("numel", [5, 64, 4099])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_trimming_counts_match_the_definitions(n: int, numel: int) -> None:
    base, models = inputs(n, numel, seed=7 * n + numel, base_dtype=torch.float32, model_dtype=torch.bfloat16)
    tau = torch.stack([m.float() - base for m in models]).abs()
    # Cut-offs at values the task vectors hold (entries equal to the cut-off are kept), and one of 0.
    cuts = [float(row.kthvalue(max(1, numel // 3)).values) for row in tau]
    cuts[0] = 0.0
    shrink = [trim_threshold(c, torch.float32) for c in cuts]
    assert_matches(kernel.measure(base, models, shrink), reference(base, models, shrink))


@pytest.mark.parametrize("numel, at", [(40, 3), (15, 9)], ids=["vectors", "tail"])
def test_exact_cancellations_nan_and_infinities_count_as_numpy_counts_them(numel: int, at: int) -> None:
    """The special values at positions `at` to `at + 3`: in the vector loop, or in the last numel % 8."""
    base = torch.zeros(numel)
    a = torch.linspace(-1, 1, numel)
    b = -a  # the elected sum is exactly 0: undecided everywhere a and b alone are kept
    c = torch.zeros(numel)
    c[::5] = 0.5
    a[at], b[at], c[at] = float("nan"), 0.5, -0.5  # a sign conflict beside a NaN is none (numpy's max/min)
    a[at + 1], b[at + 1] = float("inf"), float("-inf")
    a[at + 2], c[at + 2] = float("inf"), float("-inf")  # inf + -inf: a NaN sum, no elected sign
    c[at + 3] = float("-inf")
    models = [a, b, c]
    for shrink in (None, [trim_threshold(0.3, torch.float32), -1.0, trim_threshold(0.5, torch.float32)]):
        expected = reference(base, models, shrink)
        assert np.isnan(expected["gram"]).any() and np.isinf(expected["gram"]).any()  # type: ignore[call-overload]
        assert_matches(kernel.measure(base, models, shrink), expected)  # NaN and ±Inf where they are expected
        assert expected["conflict"] > 0
        if shrink is not None:
            assert sum(expected["undecided_pos"]) > 0 and sum(expected["nan"]) == 1  # type: ignore[arg-type]


def test_the_elected_sign_is_torch_sums_in_model_order() -> None:
    """Rows whose float32 sum depends on the order of the additions: 1e8 − 1e8 + 1 is 1 left to right and 0
    right to left. With eight models, torch.sum(dim=0) adds left to right, and so does the kernel."""
    numel = 64
    rows = torch.zeros(8, numel)
    rows[0], rows[1], rows[2] = 1e8, -1e8, 1.0
    rows[3:, ::2] = 1.0
    rows[3:, 1::3] = -1.0
    models = list(rows)
    shrink = [-1.0] * 8
    expected = reference(torch.zeros(numel), models, shrink)
    assert expected["sign_sum"] > 0  # the order-sensitive columns elect +1
    assert_matches(kernel.measure(torch.zeros(numel), models, shrink), expected)


def test_trimming_keeps_the_cut_off_and_drops_the_value_just_below_it() -> None:
    cut = 0.25
    below = float(torch.nextafter(torch.tensor(cut), torch.tensor(0.0)))
    values = torch.tensor([cut, -cut, below, -below, 0.0, 1.0, -1.0, 2 * cut])
    counts = kernel.measure(torch.zeros(8), [values], [trim_threshold(cut, torch.float32)])
    assert counts is not None
    assert counts.kept.tolist() == [5]  # ±cut, ±1 and 2·cut


def test_inputs_it_does_not_take_are_left_to_torch() -> None:
    base, models = inputs(3, 64, seed=0, base_dtype=torch.float32, model_dtype=torch.float16)
    assert kernel.measure(base, models, None) is None  # float16
    base, models = inputs(9, 64, seed=0, base_dtype=torch.float32, model_dtype=torch.bfloat16)
    assert kernel.measure(base, models, None) is None  # more than kernel.MAX_MODELS
    assert kernel.measure(base[::2], [m[::2] for m in models[:3]], None) is None  # not contiguous


@pytest.mark.parametrize("built", [True, False])
def test_a_merge_without_the_kernel_says_so_and_measures_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: bool
) -> None:
    if not built:
        monkeypatch.setattr(kernel, "_library", lambda: None)  # what an install without a C compiler has
    models = ", ".join(f'"{TINY / m}"' for m in ("math", "coder", "instruct"))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "task_arithmetic"\nbase = "{TINY / "base"}"\nmodels = [{models}]\n')
    said: list[str] = []
    result = api.merge(
        recipe, output_dir=tmp_path / "out", push=False, quiet=True, sanity=False, log=said.append
    )
    assert (kernel.MISSING in said) is not built
    assert result.stats is not None and result.stats["total"]["norm"][0] > 0
