"""What a search varies: the `[search]` table as a typed `SearchSpec`, its values as Optuna distributions, and
a trial's values written into the recipe.

A searched value is named by its recipe path: `parameters.NAME` (a method parameter, or a per-model one's
default for every model) or `models[I].NAME` (one model's own). A trial's recipe is the original recipe's
TOML document (document.py) with those values set (`apply`). Imports no optuna until a distribution is
asked for.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..merging.methods import Method, Param
from ..merging.schedule import is_schedule
from ..recipe.schema import Problem

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


__all__ = ["LOSS", "Dimension", "SearchSpec", "apply", "search_spec"]

LOSS = "loss"  # the built-in objective: mean loss per token ("loss.DOMAIN": one domain's)
_PARAMETER = re.compile(r"^parameters\.([A-Za-z_]\w*)$")
_MODEL = re.compile(r"^models\[(\d+)\]\.([A-Za-z_]\w*)$")

Value = float | int | bool | str


@dataclass(frozen=True)
class Dimension:
    """One searched value: where it goes in the recipe, and what it is drawn from."""

    path: str  # "parameters.scaling_factor", "models[1].weight"
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Value, ...] = ()
    integer: bool = False  # an int parameter: drawn as an int
    layers_per_group: int | None = None  # one value per group of this many decoder layers
    filters: tuple[str, ...] = ()  # with layers_per_group: one value per group and filter
    # The recipe's own value (or the parameter's default); with layers_per_group, that of the tensors outside
    # the decoder layers. None: the recipe has a gradient or filter rules there.
    written: Value | None = None

    def holds(self, value: Value) -> bool:
        """Whether `value` is one this dimension can draw."""
        if self.choices:
            return value in self.choices
        if isinstance(value, (bool, str)) or self.low is None or self.high is None:
            return False
        if not self.low <= value <= self.high or (self.integer and not float(value).is_integer()):
            return False
        return (
            self.step is None
            or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-9
        )

    def names(self, layers: int) -> list[tuple[str, tuple[str, ...]]]:
        """The values this dimension stands for in a model of `layers` decoder layers: (the value's name in
        the study, the tensor-name substrings it applies to; none: the whole path)."""
        if self.layers_per_group is None:
            return [(self.path, ())]
        named = []
        for start in range(0, layers, self.layers_per_group):
            group = range(start, min(start + self.layers_per_group, layers))
            for f in self.filters or ("",):
                name = f"{self.path}@layers.{group[0]}-{group[-1]}" + (f".{f}" if f else "")
                named.append((name, tuple(f"layers.{i}.{f}." if f else f"layers.{i}." for i in group)))
        return named

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices:
            return CategoricalDistribution(self.choices)
        assert self.low is not None and self.high is not None
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list[Value]:
        """Every value the grid sampler tries."""
        if self.choices:
            return list(self.choices)
        assert self.low is not None and self.high is not None and self.step is not None
        count = int((self.high - self.low) / self.step + 1e-9) + 1
        values = [self.low + i * self.step for i in range(count)]
        # low + i·step drifts in binary (0.1 + 2·0.1 = 0.30000000000000004); 12 significant digits keep
        # what the author wrote.
        return [int(v) if self.integer else float(f"{v:.12g}") for v in values]


@dataclass(frozen=True)
class SearchSpec:
    """The `[search]` table, checked against the recipe's method and models."""

    dimensions: tuple[Dimension, ...]
    objective: Mapping[str, float]  # "loss", "loss.DOMAIN" or an [eval] task → weight
    trials: int = 20
    timeout: float | None = None
    sampler: str = "tpe"
    pruner: str = "median"  # "median", "hyperband" or "none"
    seed: int | None = None
    concurrency: int | Literal["auto"] | None = None  # None: one at a time locally
    texts: Path | None = None  # a text file for the loss; None: the sanity texts
    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None

    def values(self, layers: int) -> dict[str, Dimension]:
        """Every value the study draws, by name, for a model of `layers` decoder layers."""
        return {name: d for d in self.dimensions for name, _ in d.names(layers)}

    def as_written(self, layers: int) -> dict[str, Value] | None:
        """The recipe's own values, by their names in the study; None when one is not in the space."""
        values = {name: d.written for name, d in self.values(layers).items()}
        if any(v is None or not self.values(layers)[n].holds(v) for n, v in values.items()):
            return None
        return values  # type: ignore[return-value]

    @property
    def grouped(self) -> bool:
        """Whether a value is searched per group of layers (the search then needs the layer count)."""
        return any(d.layers_per_group is not None for d in self.dimensions)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The [eval] tasks the objective names."""
        return tuple(k for k in self.objective if k != LOSS and not k.startswith(LOSS + "."))


def _param(method: Method, path: str, models: int) -> tuple[Param, str]:
    """The parameter a space path names, or why it names none."""
    key = f'search.space."{path}"'
    if m := _PARAMETER.match(path):
        name = m.group(1)
        known = {p.name: p for p in (*method.params, *method.model_params)}
        if name not in known:
            names = ", ".join(known) or "none"
            raise Problem(key, f"{method.name} has no parameter {name!r} (its parameters: {names})")
        return known[name], key
    if m := _MODEL.match(path):
        index, name = int(m.group(1)), m.group(2)
        if index >= models:
            raise Problem(key, f"the recipe has {models} models (models[0] to models[{models - 1}])")
        known = {p.name: p for p in method.model_params}
        if name not in known:
            names = ", ".join(known) or "none"
            raise Problem(key, f"{method.name} has no per-model parameter {name!r} (per-model: {names})")
        return known[name], key
    raise Problem(key, 'is not a recipe path; write "parameters.NAME" or "models[I].NAME"')


def _groups(param: Param, key: str, table: Any, written: Any) -> dict[str, Any]:
    """The per-layer-group fields of a dimension, and the value the recipe gives it."""
    value = None if is_schedule(written) else param.default if written is None else written
    if table.layers_per_group is None:
        if table.filters is not None:
            raise Problem(f"{key}.filters", "needs layers_per_group: filters split each group of layers")
        return {"written": value}
    if not param.per_tensor:
        raise Problem(f"{key}.layers_per_group", f"{param.name} is one value for the whole model")
    if value is None:
        raise Problem(
            f"{key}.layers_per_group",
            f"give {param.name} a value in the recipe: it is kept for the tensors outside the decoder layers",
        )
    return {
        "layers_per_group": table.layers_per_group,
        "filters": tuple(table.filters or ()),
        "written": value,
    }


def _dimension(
    method: Method, path: str, table: Any, models: int, sampler: str, written: Mapping[str, Any]
) -> Dimension:
    param, key = _param(method, path, models)
    own = written.get(path, written.get(f"parameters.{param.name}"))  # a model's own, else [parameters]'
    groups = _groups(param, key, table, own)
    if hasattr(table, "choices"):
        for value in table.choices:
            problem = param.check_scalar(value)
            if problem is not None:
                raise Problem(f"{key}.choices", f"{param.name} {problem}")
        return Dimension(path, choices=tuple(table.choices), **groups)
    if param.type not in (int, float):
        raise Problem(key, f"{param.name} is not a number; search it with {{ choices = [...] }}")
    integer = param.type is int
    for bound in ("low", "high"):
        value = getattr(table, bound)
        if integer and not float(value).is_integer():
            raise Problem(f"{key}.{bound}", f"{param.name} is an integer, got {value!r}")
        problem = param.check_scalar(int(value) if integer else value)
        if problem is not None:
            raise Problem(f"{key}.{bound}", f"{param.name} {problem}")
    if sampler == "grid" and table.step is None:
        raise Problem(key, "the grid sampler needs a step in every range (or choices)")
    return Dimension(path, table.low, table.high, table.step, table.log, integer=integer, **groups)


def search_spec(
    table: Any,
    method: Method,
    written: Mapping[str, Any],
    models: int,
    eval_tasks: Sequence[str],
    root: Path,
    domains: Sequence[str],
) -> SearchSpec:
    """The validated `[search]` table (schema.SearchTable) checked against the recipe; raises `Problem`.

    `written`: the recipe's own settings by path ("parameters.NAME", "models[I].NAME"). `domains`: the
    sanity texts' domains, for `loss.DOMAIN` keys (a `texts` file has the one domain "text").
    """
    dimensions = tuple(
        _dimension(method, p, t, models, table.sampler, written) for p, t in table.space.items()
    )
    texts = (root / Path(table.texts).expanduser()).resolve() if table.texts else None
    if texts is not None and not texts.is_file():
        raise Problem("search.texts", f"no such file {texts} (relative to the recipe)")
    known = ("text",) if texts is not None else tuple(domains)
    if not table.objective:
        raise Problem("search.objective", 'is empty; give "loss" = 1.0 or an [eval] task and its weight')
    for name, weight in table.objective.items():
        key = f"search.objective.{name}" if re.fullmatch(r"[\w-]+", name) else f'search.objective."{name}"'
        if weight == 0:
            raise Problem(key, "a weight of 0 counts for nothing; remove the key or give it a weight")
        if name.startswith(LOSS + ".") and name[len(LOSS) + 1 :] not in known:
            raise Problem(key, f"no such text domain; the texts' domains: {', '.join(known)}")
        if name != LOSS and not name.startswith(LOSS + ".") and name not in eval_tasks:
            where = f"one of eval.tasks ({', '.join(eval_tasks)})" if eval_tasks else "an [eval] task"
            raise Problem(key, f'is neither "loss", "loss.DOMAIN" nor {where}')
    r = table.resources
    return SearchSpec(
        dimensions=dimensions,
        objective=dict(table.objective),
        trials=table.trials,
        timeout=table.timeout,
        sampler=table.sampler,
        pruner=table.pruner,
        seed=table.seed,
        concurrency=table.concurrency,
        texts=texts,
        cpus=r.cpus,
        gpus=r.gpus,
        memory=r.memory,
    )


# --- the recipe with a trial's values ------------------------------------------------------------------


def _settings(spec: SearchSpec, values: Mapping[str, Value], layers: int) -> dict[str, Any]:
    """The recipe setting of each searched path: a value, or filter rules for values per group of layers."""
    settings: dict[str, Any] = {}
    for d in spec.dimensions:
        named = d.names(layers)
        if d.layers_per_group is None:
            settings[d.path] = values[d.path]
            continue
        rules = [{"filter": sub, "value": values[name]} for name, subs in named for sub in subs]
        settings[d.path] = [*rules, {"value": d.written}]
    return settings


def apply(
    document: Mapping[str, Any], spec: SearchSpec, values: Mapping[str, Value], layers: int
) -> dict[str, Any]:
    """A copy of the recipe's TOML `document` with a trial's `values` (by their names in the study) set at
    their paths, for a model of `layers` decoder layers."""
    out = copy.deepcopy(dict(document))
    for path, value in _settings(spec, values, layers).items():
        if m := _PARAMETER.match(path):
            out.setdefault("parameters", {})[m.group(1)] = value
        elif m := _MODEL.match(path):
            index, name = int(m.group(1)), m.group(2)
            entry = out["models"][index]
            entry = {"source": entry} if isinstance(entry, str) else entry
            out["models"][index] = {**entry, name: value}
        else:  # search_spec accepted it
            raise AssertionError(path)
    return out
