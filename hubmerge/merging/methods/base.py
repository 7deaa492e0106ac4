"""What a merge method is: its parameters, its input contract, the statistics it gathers, its merge step.

A method is one `Method` value in one file of this package. The engine runs every method the same way,
one output tensor at a time, holding a slice of each input (`plan.CHUNK_ELEMENTS`), never a whole tensor:

1. each of the method's `passes`, in order, over every slice of the tensor (of the whole model for a
   pass with `scope="model"`): a `Reduce` folds the slices into a small accumulator (norms, dot
   products, sums), a `Select` finds exact k-th smallest values of a per-element quantity (magnitude
   cut-offs) with the streaming selection of `selection.py`;
2. `merge` on every slice, with the results of the passes (`Stats`), writing the output.

So an elementwise method costs one read of its inputs, a method with one per-tensor reduction two, and
the plan records which (`Method.reads`). Methods never read files and never see the recipe: the plan
resolves every parameter for every tensor (gradients and filters, `schedule.py`) into `Slice.params` and
`Slice.model_params`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..schedule import Scalar, Setting

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

__all__ = [
    "SYMBOLS",
    "Citation",
    "Contract",
    "Deferral",
    "Deferred",
    "FusionBenchConfig",
    "MergekitParams",
    "Method",
    "Param",
    "Reduce",
    "Select",
    "Slice",
    "Stats",
    "trim_",
    "trim_threshold",
    "uniform",
]

Stats = Mapping[str, Any]  # pass name -> its result (a Reduce's accumulator, a Select's list of values)
# Whether a pass runs, from the recipe's settings: `[parameters]` (defaults filled in) and each model's own.
When = Callable[[Mapping[str, Setting], Sequence[Mapping[str, Setting]]], bool]


@dataclass(frozen=True)
class Param:
    """A declared parameter: type, default (None: the recipe must give it), allowed values, help."""

    name: str
    type: type
    default: Scalar | None
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    # False for a value that is one number for the whole model (a global cut, a seed): no gradient, no filter.
    per_tensor: bool = True
    # The symbol the method's formula uses for it ("λ", "wᵢ"): the card's legend explains it by this name.
    symbol: str | None = None

    def check_scalar(self, value: Any) -> str | None:
        """Why one scalar `value` is not acceptable, or None."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            name = {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}[
                self.type.__name__
            ]
            return f"must be a {name}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(number, float) and not math.isfinite(number):  # TOML has nan and inf literals
            return f"must be a finite number, got {value!r}"
        if self.minimum is not None and number is not None and number < self.minimum:
            return f"must be >= {self.minimum}, got {value!r}"
        if self.maximum is not None and number is not None and number > self.maximum:
            return f"must be <= {self.maximum}, got {value!r}"
        return None

    def cast(self, value: Scalar) -> Scalar:
        return float(value) if self.type is float and not isinstance(value, bool) else value


@dataclass(frozen=True)
class Contract:
    """Which inputs a method takes: the base (required, used when given, or ignored) and how many models."""

    base: Literal["required", "optional", "ignored"]
    min_models: int = 1
    max_models: int | None = None

    def describe(self) -> str:
        count = (
            f"exactly {self.min_models}"
            if self.max_models == self.min_models
            else f"{self.min_models} or more"
            if self.max_models is None
            else f"{self.min_models} to {self.max_models}"
        )
        model = "model" if self.max_models == 1 else "models"
        return f"base {self.base}; {count} {model}"


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one output tensor from every input, as a pass or a merge step sees them.

    `base` (when the method uses one) arrives in the compute dtype (float32, float64 for float64
    inputs); so does `models[0]` when there is no base. The other models keep their stored dtype (bf16,
    f16): pair each with a compute-dtype tensor in every operation (type promotion then computes exactly
    what an upcast copy would, without the copy) or call `upcast`. Slices hold whole rows, so a per-row
    quantity needs no pass.
    """

    name: str  # the output tensor's name
    shape: tuple[int, ...]  # the whole tensor's shape
    start: int  # first row of the slice
    base: Tensor | None
    models: tuple[Tensor, ...]
    params: Mapping[str, Scalar]  # global parameters, resolved for this tensor
    model_params: tuple[Mapping[str, Scalar], ...]  # one mapping per model, resolved for this tensor

    @property
    def numel(self) -> int:
        """Elements of the whole tensor."""
        return math.prod(self.shape)

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def offset(self) -> int:
        """Flat index, in the whole tensor, of the slice's first element."""
        return self.start * self.row_size

    @property
    def dtype(self) -> Any:
        """The compute dtype."""
        return (self.base if self.base is not None else self.models[0]).dtype

    def upcast(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.dtype)

    def weights(self, name: str = "weight") -> list[float]:
        return [float(p[name]) for p in self.model_params]

    def uniform(self, model: int) -> Tensor:
        """Uniform [0, 1) values for this slice's elements: a function of the recipe's seed, the tensor's
        name, the model's index and each element's flat position only (see `uniform`)."""
        first = self.models[model]
        return uniform(
            int(self.params.get("seed", 0)), self.name, model, self.offset, first.numel(), first.device
        ).view(first.shape)


@dataclass(frozen=True)
class Reduce:
    """A streaming reduction over every slice of a tensor: `step(slice, stats, accumulator) -> accumulator`.

    `step` gets None as the accumulator on the first slice; the last accumulator is the pass's result.
    """

    name: str
    step: Callable[[Slice, Stats, Any], Any]
    scope: Literal["tensor", "model"] = "tensor"
    when: When | None = None  # None: always
    # A tensor-scope pass that only some tensors need (a per-row quantity is local to a slice, except on a
    # 1-D tensor, which is one row): on for tensors of these shapes (None: every tensor). The others are
    # not read for it, and their merge step finds no entry under `name` in its stats.
    shapes: Callable[[tuple[int, ...]], bool] | None = None


@dataclass(frozen=True)
class Select:
    """Exact k-th smallest values of a per-element quantity, over a whole tensor (or the whole model).

    `quantity(slice, stats)` gives one float32 row per selected series, shape (rows, slice elements), all
    values >= 0 (magnitudes); `ranks(numel, slice)` gives each row's 1-based rank k over `numel` elements
    (0: no cut). The result is a list with, per row, the k-th smallest value, bit-identical to
    `torch.kthvalue` over the whole series (`selection.py`), or 0.0 for rank 0.
    """

    name: str
    quantity: Callable[[Slice, Stats], Tensor]
    ranks: Callable[..., list[int]]  # (numel, slice), or (numel, slice, stats) with `ranks_use_stats`
    scope: Literal["tensor", "model"] = "tensor"
    when: When | None = None  # None: always
    # True: `ranks(numel, slice, stats)` also gets the results of the passes before it, for a rank that
    # depends on a count only a pass can make (sce: a fraction of the entries with nonzero variance).
    ranks_use_stats: bool = False


Pass = Reduce | Select


@dataclass(frozen=True)
class Deferred:
    """A merge step's result that leaves some positions open until the whole model is merged.

    `values` are written now, each open position holding its value under the outcome the method assumes;
    `positions` are those flat positions within the slice (ascending), `alternatives` the values they take
    under each other outcome (one tensor per outcome, one value per position), and `tally` this slice's
    share of what decides the outcome (a number: the engine adds the tallies of every slice and hands the
    total to `Deferral.decide`). The engine spills the open positions to a scratch file as they come and
    rewrites them in the closed shards after the last one when the outcome is not the assumed one.
    """

    values: Tensor
    tally: Any
    positions: Tensor
    alternatives: tuple[Tensor, ...]


@dataclass(frozen=True)
class Deferral:
    """How a method whose `merge` may return `Deferred` settles the open positions after the last shard."""

    # From the sum of every slice's tally: the index of the alternative the open positions take, or None
    # when the outcome is the one `values` assumed (nothing to rewrite).
    decide: Callable[[Any], int | None]
    # A model-scope pass whose result, in the merge step's stats, settles the outcome up front, so that
    # `merge` returns no `Deferred` and no closed shard is rewritten; the plan runs it (one read more) when
    # closed shards may not be rewritten: they are uploaded and deleted as the merge goes
    # (`DiskPlan.settle_first`). Its step sees each tensor's stats.
    settle: Reduce
    # For the disk estimate of the scratch file: the outcomes besides the assumed one (values per open
    # position), and the percentage of positions expected open.
    alternatives: int = 1
    open_percent: int = 1


# Symbols every formula may use without declaring them; a method adds its own with `Param.symbol` and
# `Method.symbols`. The card's legend lists those that occur in the formula, in this order.
SYMBOLS: tuple[tuple[str, str], ...] = (
    ("θ", "the merged parameters"),
    ("θᵢ", "the parameters of model i"),
    ("θ_base", "the parameters of the base"),
    ("τᵢ", "the task vector θᵢ − θ_base"),
    ("n", "the number of models"),
)


@dataclass(frozen=True)
class Citation:
    """A paper as the card cites it: in the text (`cite`, `title`) and as a BibTeX entry (arXiv)."""

    cite: str  # "Yadav et al. 2023"
    title: str
    authors: str  # BibTeX form: "First Last and First Last"
    year: int
    key: str  # the BibTeX key

    def bibtex(self, arxiv_id: str) -> str:
        return (
            f"@misc{{{self.key},\n      title={{{self.title}}},\n      author={{{self.authors}}},\n"
            f"      year={{{self.year}}},\n      eprint={{{arxiv_id}}},\n      archivePrefix={{arXiv}},\n"
            f"      primaryClass={{cs.LG}},\n      url={{https://arxiv.org/abs/{arxiv_id}}},\n}}"
        )


@dataclass(frozen=True)
class FusionBenchConfig:
    """A FusionBench method config whose merge a recipe of this method reproduces (the card's reference).

    The card names it when the recipe merges one of FusionBench's Qwen2.5-1.5B pools onto its base with
    exactly `parameters`.
    """

    config: str  # under FusionBench's config/method/: "linear/ties_merging_for_causallm"
    # The value each parameter must have, global or per model (resolved: model, [parameters], default).
    parameters: Mapping[str, Scalar] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # the parameters the command line sets (`method.NAME=value`)
    config_json: str | None = None  # the model FusionBench takes config.json from, when not the base


@dataclass(frozen=True)
class MergekitParams:
    """The parameters of the mergekit 0.1.5 method of the same math (`Method.mergekit`), as its
    `MergeMethodSpec` declares them: name -> mergekit's default (None: required). `hubmerge import-mergekit`
    converts a config with them.

    mergekit reads `shared` ones only from the top-level (or slice) `parameters`, `per_model` ones from a
    model's own `parameters` first. `renamed` maps a mergekit parameter to this method's name for it.
    """

    shared: Mapping[str, Scalar | None] = field(default_factory=dict)
    per_model: Mapping[str, Scalar | None] = field(default_factory=dict)
    renamed: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)  # one value per method in the registry: compared and hashed by identity
class Method:
    """One merge method: everything the recipe, plan, engine, card and documentation know of it."""

    name: str
    title: str
    formula: str  # one line, with the symbols of `SYMBOLS` and those the method declares (`legend`)
    contract: Contract
    merge: Callable[[Slice, Stats], Any]  # a Tensor in the compute dtype, or a `Deferred` (see `deferral`)
    params: tuple[Param, ...] = ()  # global: `[parameters]`
    model_params: tuple[Param, ...] = ()  # per model: `[[models]]` (a value in `[parameters]` is the default)
    passes: tuple[Pass, ...] = ()
    paper: str | None = None  # "arXiv:2306.01708"
    mergekit: str | None = None  # the mergekit 0.1.5 `merge_method` with the same math, if any
    mergekit_params: MergekitParams = field(default_factory=MergekitParams)  # with `mergekit`
    fusionbench: str | None = None  # the FusionBench algorithm with the same math, if any
    notes: str = ""  # what a user must know: differences from the tool of the same name, caveats
    # Why one model's parameters, resolved for one tensor, do not go together (della's d ± ε), or None.
    # The plan reports it as a recipe error before anything is downloaded.
    check: Callable[[Mapping[str, Scalar]], str | None] | None = None
    # Why the recipe's settings together make no merge (linear's weights summing to 0), or None: given
    # `[parameters]` and each model's settings with the `[parameters]` defaults applied. A recipe error.
    check_models: Callable[[Mapping[str, Setting], Sequence[Mapping[str, Setting]]], str | None] | None = None
    # Warnings on the given `[parameters]` that are valid but more likely a misreading than the intent
    # (ties's `threshold = 1`): "key ...: message" lines, printed with the recipe's path.
    advise: Callable[[Mapping[str, Setting]], tuple[str, ...]] | None = None
    # The name of the pass whose result is, per model, a magnitude cut-off: a method that keeps the entries
    # with |τᵢ| >= it (`trim_`) and elects a sign (sign(Σ trimmed τ), the model-wide majority where that is
    # 0). The diagnostics then report kept and dropped shares from that pass's result (`trims`).
    cuts: str | None = None
    # Set when `merge` may leave positions open until the whole model is merged (`Deferred`).
    deferral: Deferral | None = None
    citation: Citation | None = None  # how the card cites `paper` (None: by its arXiv id, no BibTeX)
    fusionbench_config: FusionBenchConfig | None = None
    description: str = ""  # a paragraph the card prints under the formula: what its operations do
    symbols: tuple[tuple[str, str], ...] = ()  # (symbol, meaning) the formula uses beyond params' symbols
    # Keys a user brings from another tool's method of the same name -> what to write instead: the recipe
    # error for such a key says "unknown key; " and this.
    key_hints: Mapping[str, str] = field(default_factory=dict)

    @property
    def trims(self) -> bool:
        """Whether the diagnostics report kept and dropped shares (`cuts`)."""
        return self.cuts is not None

    @property
    def settle(self) -> Reduce | None:
        """The pass that settles up front what `merge` would otherwise leave open (`Deferral.settle`)."""
        return self.deferral.settle if self.deferral is not None else None

    @property
    def needs_base(self) -> bool:
        return self.contract.base == "required"

    @property
    def uses_base(self) -> bool:
        """The base's weights enter the math when the recipe names a base."""
        return self.contract.base != "ignored"

    def active_passes(
        self, params: Mapping[str, Setting], models: Sequence[Mapping[str, Setting]]
    ) -> tuple[Pass, ...]:
        """The passes a recipe's settings switch on: `[parameters]` and each model's own."""
        return tuple(p for p in self.passes if p.when is None or p.when(params, models))

    def reads(self, params: Mapping[str, Setting], models: Sequence[Mapping[str, Setting]]) -> int:
        """How many times the engine reads every input byte, at most: once per pass (a pass limited by
        `Reduce.shapes` reads only those tensors), plus the merge (a selection that its sample does not
        settle reads twice more, see `selection.py`)."""
        return 1 + len(self.active_passes(params, models))

    def max_reads(self) -> int:
        """`reads` with every pass on: passes of one name are alternatives (one result, chosen by `when`)."""
        return 1 + len({p.name for p in self.passes})

    def legend(self) -> list[tuple[str, str]]:
        """(symbol, meaning) of each symbol in the formula: the common ones, the parameters', the method's."""
        declared = [
            *SYMBOLS,
            *((p.symbol, f"`{p.name}`") for p in self.params if p.symbol),
            *((p.symbol, f"the `{p.name}` of model i") for p in self.model_params if p.symbol),
            *self.symbols,
        ]
        return [
            (symbol, meaning)
            for symbol, meaning in declared
            if re.search(rf"(?<!\w){re.escape(symbol)}(?!\w)", self.formula)
        ]

    def param(self, name: str) -> Param:
        return next(p for p in self.params + self.model_params if p.name == name)

    @property
    def random(self) -> bool:
        return any(p.name == "seed" for p in self.params)


def cpu_array(tensor: Tensor) -> np.ndarray | None:
    """`tensor`'s memory as a numpy array where numpy can hold it (a CPU tensor of a numpy dtype), else None.

    On a CPU, numpy's compares, counts and lists of positions give the same values as torch's at a fifth to
    a tenth of the time (bench/RESULTS.md); bfloat16 and accelerator tensors keep torch's operations.
    """
    import torch

    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64, torch.float16):
        return None
    return tensor.detach().numpy()


def trim_(task_vector: Tensor, cut: float) -> Tensor:
    """Keep the entries with |τ| >= `cut` (a number of τ's dtype), +0 elsewhere, in place: the trimming of a
    method that `trims` (a cut-off of 0 keeps every entry).

    hardshrink keeps |τ| > λ and writes +0 elsewhere (as a mask and fill would), and with λ the largest
    value below the cut-off in τ's dtype, > λ is exactly >= cut: one vectorised pass instead of abs,
    compare and masked_fill (which are 5-15× slower on a CPU, bench/RESULTS.md).
    """
    import torch

    if cut > 0:
        torch.hardshrink(task_vector, trim_threshold(cut, task_vector.dtype), out=task_vector)
    return task_vector


def trim_threshold(cut: float, dtype: torch.dtype) -> float:
    """The hardshrink λ of `trim_` for a cut-off in `dtype`: entries with −λ <= τ <= λ become 0, the others
    (NaN too) are kept; −1 for a cut-off of 0, which keeps every entry."""
    return _below(cut, dtype) if cut > 0 else -1.0


@functools.lru_cache(maxsize=256)
def _below(cut: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` below `cut`: one per cut-off and dtype, not two tensors per piece."""
    import torch

    return float(torch.nextafter(torch.tensor(cut, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


# --- counter-based random numbers -----------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _key(seed: int, name: str, model: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def uniform(seed: int, name: str, model: int, first: int, count: int, device: Any = None) -> Tensor:
    """Uniform [0, 1) float32 values for flat positions first … first + count − 1 of tensor `name`.

    A pure function of (seed, name, model, position): splitmix64 of the position plus a key hashed from the
    rest, done in int64 arithmetic (wrapping, identical on every device), the top 24 bits giving
    multiples of 2⁻²⁴. So a random mask does not change with the slice size, the device or the order of
    work, and a `--lock` reproduction is byte-identical.
    """
    import torch

    x = torch.arange(first, first + count, dtype=torch.int64, device=device)
    x = x * _signed(0x9E3779B97F4A7C15) + _signed(_key(seed, name, model))
    x = (x ^ _logical_shift(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _logical_shift(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _logical_shift(x, 31)
    return _logical_shift(x, 40).to(torch.float32) * (1.0 / (1 << 24))


def _logical_shift(x: Tensor, bits: int) -> Tensor:
    """x >>> bits on int64 (torch's >> is arithmetic: mask off the copied sign bits)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def resolve_defaults(params: Sequence[Param], given: Mapping[str, Setting]) -> dict[str, Setting]:
    """`given` with every declared default filled in (a required parameter without a value is left out)."""
    values: dict[str, Setting] = {p.name: p.default for p in params if p.default is not None}
    values.update(given)
    return values
