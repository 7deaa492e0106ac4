"""`hubmerge import-mergekit`: a mergekit (0.1.5) YAML config turned into an equivalent hubmerge recipe.

What converts: `merge_method` (to the registered method whose `Method.mergekit` names it), `base_model`,
`models`, the whole-model form of `slices` (one output slice whose sources each span every layer), the
`parameters` at every level (scalars, gradients, filter lists), `dtype` / `out_dtype`, `tokenizer_source`
/ `tokenizer.source`, `chat_template: auto`, `path@revision` references, local paths and Hub ids.

What does not: layer-range `slices`, `modules`, LoRA `model+lora` references, mergekit-moe and
mergekit-multi configs, `tokenizer.tokens`, `tokenizer.pad_to_multiple_of`, a chat template other than the
tokenizer source's, parameters the method does not have. Each is one line naming the YAML key and what
to do (`ConfigImportError`); nothing is silently dropped. What mergekit reads but that changes nothing here
(`int8_mask`, a shared parameter written on one model, which mergekit ignores) is dropped with a note.

Equivalence, not translation: mergekit's defaults are written out where hubmerge's differ (task
arithmetic's λ is 1.0 in mergekit, 0.3 here), the base of a method that ignores it becomes one more model
(mergekit appends it to the inputs), and a base listed among mergekit's models becomes hubmerge's `base`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigImportError, RecipeError
from ..merging.methods import METHODS, Method, Param
from ..merging.methods.base import MergekitParams
from ..merging.schedule import Filter, Setting, to_json
from ..publish.files import CONFIG_FILE
from ..recipe.load import loads_recipe
from ..recipe.reference import BadReference, parse_reference
from ..recipe.schema import Problem, parse_setting
from ..recipe.write import toml_key, toml_value

__all__ = ["Imported", "import_mergekit"]


# mergekit 0.1.5's merge methods without a hubmerge one (each hubmerge method names its own: `Method.mergekit`).
_WITHOUT_HUBMERGE = ("arcee_fusion", "ram", "ramplus_tl")
# Read by mergekit, but without effect on the merged numbers: dropped with a note.
_NO_EFFECT = {"int8_mask": "it only sets the dtype of mergekit's masks (memory), not the result"}

_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
# mergekit's floating-point dtype names (common.dtype_from_name) that a recipe's `dtype` can write.
_OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
_MOE_KEYS = ("experts", "gate_mode", "experts_per_token", "shared_experts", "architecture")


@dataclass(frozen=True)
class Imported:
    """A converted config: the recipe's TOML text, its method, and what was dropped or assumed."""

    text: str
    method: str
    notes: tuple[str, ...]  # "key: message", also written as comments at the top of `text`


@dataclass(frozen=True)
class _Ref:
    """A mergekit model reference, as the recipe will name it."""

    written: str  # as the config wrote it, for messages
    source: str  # a Hub id, or a local folder relative to the recipe's folder (./...) or absolute
    revision: str | None
    path: Path | None = None  # the local folder, absolute

    @property
    def identity(self) -> tuple[str, str | None]:
        return (str(self.path) if self.path else self.source, self.revision)


@dataclass
class _Model:
    ref: _Ref
    key: str  # the YAML key it came from
    params: dict[str, Setting] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)  # hubmerge parameter -> where it came from


def _comment(text: str) -> str:
    return " ".join(text.split())  # one line, whatever the YAML held


# --- the conversion -----------------------------------------------------------------------------------


class _Converter:
    def __init__(self, config: Path, recipe_dir: Path) -> None:
        self.config = config
        self.config_dir = config.resolve().parent
        self.recipe_dir = recipe_dir
        self.problems: list[str] = []
        self.notes: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.config}: {key}: {message}" if key else f"{self.config}: {message}")

    def note(self, key: str, message: str) -> None:
        self.notes.append(f"{key}: {message}")

    # References ---------------------------------------------------------------------------------------

    def reference(self, value: Any, key: str) -> _Ref | None:
        if not isinstance(value, str) or not value.strip():
            self.problem(key, f"must be a model reference string path[@revision], got {value!r}")
            return None
        text = value.strip()
        if "+" in text:
            model, _, lora = text.partition("+")
            self.problem(
                key,
                f"{text!r} applies the LoRA adapter {lora!r}: hubmerge merges full checkpoints only; merge the "
                f"adapter into {model!r} first (peft's merge_and_unload) and name that checkpoint here",
            )
            return None
        if text.count("@") > 1:
            self.problem(key, f"{text!r} has more than one '@'; write path@revision")
            return None
        name, _, revision = text.partition("@")
        if not name:
            self.problem(key, f"{text!r} names no model before '@'")
            return None
        try:
            # mergekit splits the revision off first, and reads a folder relative to the config's folder, else
            # to the working directory (where mergekit-yaml resolves it).
            ref = parse_reference(name, (self.config_dir, Path.cwd()))
        except BadReference as exc:
            self.problem(key, str(exc))
            return None
        if ref.path is None:
            return _Ref(text, name, revision or None)
        if revision:
            self.problem(
                key, f"{text!r} is a local folder; a revision applies to Hub models only: drop '@{revision}'"
            )
            return None
        return _Ref(text, self.relative(ref.path), None, ref.path)

    def relative(self, folder: Path) -> str:
        """`folder` as the recipe names it: relative to the recipe's folder, prefixed ./."""
        relative = os.path.relpath(folder, self.recipe_dir)
        return relative if relative.startswith("..") else f"./{relative}"

    # Parameters ---------------------------------------------------------------------------------------

    def setting(self, method: Method, name: str, value: Any, key: str) -> Setting | None:
        """A mergekit `ParameterSetting` (scalar, gradient, one conditional or a list of them) of `method`'s
        parameter `name`, read by the recipe's parser; None, with a problem line, where it refuses it."""
        try:
            return parse_setting(method, name, _as_mergekit_reads(method.param(name), value))
        except Problem as exc:
            # Named as the YAML wrote it: a single {filter, value} mapping is read as a list of one.
            below = exc.key.removeprefix("[0]") if isinstance(value, Mapping) else exc.key
            self.problem(key + below, exc.message)
            return None


def _as_mergekit_reads(param: Param, value: Any, top: bool = True) -> Any:
    """What mergekit's (lax) pydantic makes of YAML that the recipe's (strict) parser reads otherwise: a single
    {filter, value} mapping is a list of one, `filter: null` is no filter, and a number PyYAML reads as a
    string (`1e-5`) is a number."""
    if isinstance(value, Mapping):
        rule = {k: v for k, v in value.items() if not (k == "filter" and v is None)}
        if "value" in rule:
            rule["value"] = _as_mergekit_reads(param, rule["value"], False)
        return [rule] if top else rule
    if isinstance(value, list):
        return [_as_mergekit_reads(param, v, False) for v in value]
    if isinstance(value, str) and param.type in (int, float):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if param.type is int and number.is_integer() else number
    return value


def _has_catch_all(setting: Setting) -> bool:
    return not isinstance(setting, tuple) or any(r.filter in (None, "*") for r in setting)


def _fall_through(first: Setting, then: Setting) -> Setting:
    """One setting that reads `first` and, for a tensor none of its filters match, `then` (mergekit's
    slice parameters over its top-level ones)."""
    if _has_catch_all(first):
        return first
    rules = then if isinstance(then, tuple) else (Filter(then),)
    return (*first, *rules)  # type: ignore[misc]


def _method_for(name: str) -> Method | None:
    return next((m for m in METHODS.values() if m.mergekit == name), None)


def _mergekit_names() -> list[str]:
    """mergekit 0.1.5's merge methods."""
    return [*(m.mergekit for m in METHODS.values() if m.mergekit), *_WITHOUT_HUBMERGE]


def _load_yaml(config: Path) -> Any:
    import yaml

    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{config}: no such mergekit config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{config}: cannot read the mergekit config ({exc})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{config}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(config)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        raise RecipeError(
            f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")
        ) from None
    if len(documents) > 1:
        raise ConfigImportError(
            [
                f"{config}: holds {len(documents)} YAML documents (a mergekit-multi config); put each merge in "
                "a file of its own and import each"
            ]
        )
    if not documents or not isinstance(documents[0], dict):
        raise RecipeError(f"{config}: is not a mergekit config (a YAML mapping with merge_method and models)")
    return documents[0]


def import_mergekit(config: str | Path, recipe: str | Path | None = None) -> Imported:
    """Convert the mergekit YAML config `config` into a hubmerge recipe (TOML text) that merges the same.

    `recipe` is where the recipe will be written: local model folders are named relative to its folder
    (the working directory when None). Raises `ConfigImportError` listing every key it cannot convert
    (one line each), `RecipeError` for a file that is not a readable YAML mapping. Writes nothing.
    """
    config = Path(config)
    recipe_dir = (Path(recipe).parent if recipe is not None else Path(".")).resolve()
    data = _load_yaml(config)
    c = _Converter(config, recipe_dir)
    if "merge_method" not in data and any(k in data for k in _MOE_KEYS):
        raise ConfigImportError(
            [
                f"{config}: is a mergekit-moe config ({', '.join(k for k in _MOE_KEYS if k in data)}): hubmerge "
                "merges dense models into one of the same shape and builds no mixture of experts; use mergekit-moe"
            ]
        )
    for key in data:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"mergekit's keys are {', '.join(_KEYS)}"
            c.problem(
                str(key), f"is not a mergekit config key (mergekit ignores it); {hint} Remove or fix it"
            )

    method_name = data.get("merge_method")
    method: Method | None = None
    spec: MergekitParams | None = None
    if not isinstance(method_name, str):
        c.problem("merge_method", "is required: the mergekit method, e.g. dare_ties")
    elif method_name not in (mergekit_names := _mergekit_names()):
        close = difflib.get_close_matches(method_name.replace("-", "_"), mergekit_names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"mergekit's are {', '.join(mergekit_names)}"
        c.problem("merge_method", f"{method_name!r} is not a mergekit 0.1.5 method; {hint}")
    else:
        method = _method_for(method_name)
        spec = method.mergekit_params if method is not None else None
        if method is None:
            known = ", ".join(m.mergekit for m in METHODS.values() if m.mergekit)
            c.problem(
                "merge_method",
                f"mergekit's {method_name!r} has no hubmerge method (hubmerge has mergekit's {known}); "
                "merge with mergekit, or pick one of those",
            )

    base, sources, slice_params = _inputs(c, data)
    models = _models(c, method, spec, base, sources)
    parameters, comments = _parameters(c, method, spec, data.get("parameters"), slice_params, models)
    dtype_line = _dtype(c, data)
    tokenizer = _tokenizer(c, data)
    _chat_template(c, data)

    if c.problems:
        raise ConfigImportError(c.problems)
    assert method is not None  # a method without a hubmerge counterpart is a problem above
    text = _render(c, method, method_name, base, models, parameters, comments, dtype_line, tokenizer)
    _check(c, text)
    return Imported(text=text, method=method.name, notes=tuple(c.notes))


# --- inputs -------------------------------------------------------------------------------------------


@dataclass
class _Source:
    ref: _Ref
    params: Mapping[str, Any]
    key: str


def _inputs(c: _Converter, data: Mapping[str, Any]) -> tuple[_Ref | None, list[_Source], Mapping[str, Any]]:
    """The base, the models in mergekit's order with their own parameters, and a slice's parameters."""
    base_value = data.get("base_model")
    base = c.reference(base_value, "base_model") if base_value is not None else None
    given = [k for k in ("models", "slices", "modules") if data.get(k)]
    if "modules" in given:
        c.problem(
            "modules",
            "per-module merges (vision-language and other multi-module models) cannot be converted: hubmerge "
            "merges Qwen2.5 language models as one module; use models: or merge with mergekit",
        )
        return base, [], {}
    if len(given) != 1:
        c.problem(
            "models", "is required: the models to merge (mergekit needs exactly one of models or slices)"
        )
        return base, [], {}
    if given == ["models"]:
        raw = data["models"]
        if not isinstance(raw, list):
            c.problem("models", "must be a list of {model, parameters} entries")
            return base, [], {}
        sources = []
        for i, entry in enumerate(raw):
            key = f"models[{i}]"
            if not isinstance(entry, Mapping) or "model" not in entry:
                c.problem(key, f"must be a mapping with 'model' (and optional 'parameters'), got {entry!r}")
                continue
            for extra in set(entry) - {"model", "parameters"}:
                c.problem(f"{key}.{extra}", "is not a mergekit model key; a model holds model and parameters")
            ref = c.reference(entry["model"], f"{key}.model")
            params = _mapping(c, entry.get("parameters"), f"{key}.parameters")
            if ref is not None:
                sources.append(_Source(ref, params, key))
        return base, sources, {}
    return _whole_model_slice(c, data["slices"], base)


def _mapping(c: _Converter, value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        c.problem(key, f"must be a mapping of parameter names to values, got {value!r}")
        return {}
    return value


def _layer_count(folder: Path) -> int | None:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        layers = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    except (OSError, ValueError, AttributeError):
        return None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


def _whole_model_slice(
    c: _Converter, slices: Any, base: _Ref | None
) -> tuple[_Ref | None, list[_Source], Mapping[str, Any]]:
    """`slices: [{sources: [{model, layer_range: [0, N]}, ...]}]` spanning every layer is `models:`."""
    cannot = (
        "hubmerge merges whole models layer by layer and cannot stack, drop or mix layer ranges (a "
        "frankenmerge); merge with mergekit"
    )
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        count = len(slices) if isinstance(slices, list) else "not a list of"
        c.problem("slices", f"{count} output slices: {cannot}")
        return base, [], {}
    out = slices[0]
    for extra in set(out) - {"sources", "parameters", "base_model", "residual_weight"}:
        c.problem(f"slices[0].{extra}", "is not a mergekit slice key")
    if out.get("residual_weight") is not None:
        c.note("slices[0].residual_weight", "dropped: mergekit parses it but never uses it")
    if out.get("base_model") is not None:
        slice_base = c.reference(out["base_model"], "slices[0].base_model")
        if base is not None and slice_base is not None and slice_base.identity != base.identity:
            c.problem(
                "slices[0].base_model",
                f"differs from base_model ({base.written}); hubmerge has one base for the math, config.json "
                "and tokenizer: keep one of them",
            )
        base = slice_base or base
    raw_sources = out.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        c.problem("slices[0].sources", "must be a non-empty list of {model, layer_range} entries")
        return base, [], {}
    sources: list[_Source] = []
    hub_ranges: list[str] = []
    ends: set[int] = set()
    for i, entry in enumerate(raw_sources):
        key = f"slices[0].sources[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            c.problem(key, f"must be a mapping with model and layer_range, got {entry!r}")
            continue
        for extra in set(entry) - {"model", "layer_range", "parameters"}:
            c.problem(f"{key}.{extra}", "is not a mergekit slice source key")
        ref = c.reference(entry["model"], f"{key}.model")
        params = _mapping(c, entry.get("parameters"), f"{key}.parameters")
        span = entry.get("layer_range")
        if (
            not isinstance(span, list)
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            c.problem(f"{key}.layer_range", f"must be [first, end] layer numbers, got {span!r}")
            continue
        if ref is None:
            continue
        layers = _layer_count(ref.path) if ref.path is not None else None
        if ref.path is not None and layers is None:
            c.problem(
                f"{key}.layer_range",
                f"cannot tell whether {span} is the whole model: no num_hidden_layers in "
                f"{ref.path / 'config.json'}",
            )
            continue
        whole = span[0] == 0 and (span[1] == layers if layers is not None else span[1] > 0)
        if not whole:
            of = f" (it has {layers} layers)" if layers is not None else ""
            c.problem(f"{key}.layer_range", f"{span} is not the whole of {ref.written}{of}: {cannot}")
            continue
        ends.add(span[1])
        if layers is None:
            hub_ranges.append(ref.written)
        sources.append(_Source(ref, params, key))
    if len(ends) > 1:
        c.problem(
            "slices[0].sources",
            f"span different numbers of layers ({sorted(ends)}); mergekit refuses that too",
        )
    elif hub_ranges and ends:
        c.note(
            "slices",
            f"took layer_range [0, {next(iter(ends))}] as every layer of {', '.join(hub_ranges)} (Hub models, not "
            "checked offline); hubmerge merges every layer, so check the models have that many",
        )
    return base, sources, _mapping(c, out.get("parameters"), "slices[0].parameters")


def _models(
    c: _Converter,
    method: Method | None,
    spec: MergekitParams | None,
    base: _Ref | None,
    sources: list[_Source],
) -> list[_Model]:
    """hubmerge's models from mergekit's inputs: a base mergekit lists among the models is our
    `base`; for a method that ignores the base, the base is one more model (mergekit appends it)."""
    seen: dict[tuple[str, str | None], str] = {}
    for s in sources:
        if s.ref.identity in seen:
            c.problem(
                f"{s.key}.model",
                f"{s.ref.written} is already {seen[s.ref.identity]}; mergekit refuses duplicate inputs",
            )
        seen.setdefault(s.ref.identity, s.key)
    if method is None or spec is None:
        return []
    if base is None and method.needs_base:
        c.problem(
            "base_model",
            f"is required by {method.name} (mergekit's {method.mergekit}): the model the task vectors are "
            "taken from",
        )
    entries = list(sources)
    if base is not None and not method.uses_base:
        c.note(
            "base_model",
            f"{method.name} ignores the base in its math; mergekit merges it as one more input, and so does "
            "this recipe (it also gives config.json)",
        )
        if base.identity not in seen:
            entries.append(_Source(base, {}, "base_model"))
    models = []
    for s in entries:
        if method.uses_base and base is not None and s.ref.identity == base.identity:
            dropped = [str(k) for k in s.params if k not in _NO_EFFECT]
            if dropped:
                c.note(
                    f"{s.key}.parameters",
                    f"dropped {', '.join(dropped)}: mergekit reads no per-model parameter of the base in "
                    f"{method.mergekit}",
                )
            continue
        model = _Model(s.ref, s.key)
        _model_params(c, method, spec, s, model)
        models.append(model)
    contract = method.contract
    if sources and (
        len(models) < contract.min_models
        or (contract.max_models is not None and len(models) > contract.max_models)
    ):
        counted = (
            " (with the base, which mergekit adds to the inputs)" if base and not method.uses_base else ""
        )
        others = "" if not method.uses_base else " besides the base"
        c.problem(
            "models",
            f"{method.name} takes {contract.describe().split('; ')[1]}{others}, got {len(models)}{counted}",
        )
    return models


def _hub_name(method: Method, name: str) -> str:
    declared = {p.name for p in method.params + method.model_params}
    return method.mergekit_params.renamed.get(name, name) if name not in declared else name


def _model_params(c: _Converter, method: Method, spec: MergekitParams, s: _Source, model: _Model) -> None:
    per_model = {p.name: p for p in method.model_params}
    for name, value in s.params.items():
        key = f"{s.key}.parameters.{name}"
        if name in _NO_EFFECT:
            c.note(key, f"dropped: {_NO_EFFECT[name]}")
            continue
        hub = _hub_name(method, str(name))
        if name in spec.shared:
            c.note(
                key,
                f"dropped: {name} is a global parameter of {method.mergekit}; mergekit ignores it on a model",
            )
            continue
        if not _known(c, method, spec, str(name), key):
            continue
        if hub not in per_model:
            c.problem(
                key,
                f"hubmerge's {method.name} takes {hub} for all models, not per model: move it to parameters",
            )
            continue
        setting = c.setting(method, hub, value, key)
        if setting is not None:
            model.params[hub] = setting
            model.comments[hub] = f"mergekit {key}"


def _known(c: _Converter, method: Method, spec: MergekitParams, name: str, key: str) -> bool:
    """Whether mergekit parameter `name` has a hubmerge counterpart; a problem line when not."""
    mergekit_names = (*spec.shared, *spec.per_model)
    hub = _hub_name(method, name)
    if name in mergekit_names and any(p.name == hub for p in method.params + method.model_params):
        return True
    if name in mergekit_names:
        c.problem(
            key,
            f"mergekit's {method.mergekit} parameter {name!r} has no hubmerge counterpart; remove it to merge with "
            f"hubmerge's {method.name} as it is, or merge with mergekit",
        )
        return False
    close = difflib.get_close_matches(name, mergekit_names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = ", ".join(mergekit_names) or "none"
    c.problem(
        key,
        f"{method.mergekit} has no parameter {name!r} (mergekit ignores it; its parameters: {known}); {hint}remove it",
    )
    return False


def _parameters(
    c: _Converter,
    method: Method | None,
    spec: MergekitParams | None,
    top: Any,
    slice_params: Mapping[str, Any],
    models: list[_Model],
) -> tuple[dict[str, Setting], dict[str, str]]:
    """The recipe's [parameters]: mergekit's top-level ones under the slice's, plus mergekit's defaults
    where hubmerge's differ."""
    top = _mapping(c, top, "parameters")
    if method is None or spec is None:
        return {}, {}
    declared = {p.name: p for p in method.params + method.model_params}
    settings: dict[str, Setting] = {}
    comments: dict[str, str] = {}
    for scope, values in (("slices[0].parameters", slice_params), ("parameters", top)):
        for name, value in values.items():
            key = f"{scope}.{name}"
            if name in _NO_EFFECT:
                c.note(key, f"dropped: {_NO_EFFECT[name]}")
                continue
            if not _known(c, method, spec, str(name), key):
                continue
            hub = _hub_name(method, str(name))
            setting = c.setting(method, hub, value, key)
            if setting is None:
                continue
            if hub in settings:  # the slice's value first; the top-level one where its filters match nothing
                settings[hub] = _fall_through(settings[hub], setting)
                comments[hub] += f", then {key}"
            else:
                settings[hub] = setting
                comments[hub] = f"mergekit {key}"
    for name, default in (*spec.shared.items(), *spec.per_model.items()):
        hub = _hub_name(method, name)
        if default is None or hub not in declared or declared[hub].default == default:
            continue
        ours = declared[hub].default
        why = f"mergekit's default for {method.mergekit}" + (
            f" (hubmerge's is {toml_value(ours)})" if ours is not None else ""
        )
        current = settings.get(hub)
        if current is None:
            settings[hub] = declared[hub].cast(default)
            comments[hub] = why
        elif not _has_catch_all(current):
            settings[hub] = (*current, Filter(declared[hub].cast(default)))  # type: ignore[misc]
            comments[hub] += f"; the last rule is {why}"
    for name, default in spec.shared.items():
        if default is None and _hub_name(method, name) not in settings:
            c.problem(
                f"parameters.{name}",
                f"is required by mergekit's {method.mergekit} (and by hubmerge's {method.name})",
            )
    for name, default in spec.per_model.items():
        hub = _hub_name(method, name)
        missing = [m for m in models if default is None and hub not in settings and hub not in m.params]
        for model in missing:
            if model.key == "base_model":
                c.problem(
                    "base_model",
                    f"has no {name}, which mergekit's {method.mergekit} requires of every input (it adds the "
                    f"base to them): give a default {name} in parameters, or list the base under models with one",
                )
            else:
                c.problem(
                    f"{model.key}.parameters.{name}",
                    f"is required by mergekit's {method.mergekit} for every model; give one here or a default "
                    "in parameters",
                )
    if method.random:
        c.note(
            "merge_method",
            f"{method.mergekit} draws random masks: mergekit's come from torch's generator (--random-seed), "
            f"hubmerge's from [parameters] seed, so the merge is the same in distribution, not bit for bit",
        )
    return settings, comments


# --- dtype, tokenizer, chat template --------------------------------------------------------------------


def _dtype_name(value: Any) -> str | None:
    return value.removeprefix("torch.") if isinstance(value, str) else None


def _dtype(c: _Converter, data: Mapping[str, Any]) -> tuple[str, str] | None:
    """The recipe's `dtype` (the output dtype) and where it came from."""
    dtype, out_dtype = _dtype_name(data.get("dtype")), _dtype_name(data.get("out_dtype"))
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if data.get(key) is not None and value not in (*_OUTPUT_DTYPES, "float64"):
            c.problem(key, f"unknown dtype {data[key]!r}; one of bfloat16, float16, float32, float64")
            return None
    chosen, key = (out_dtype, "out_dtype") if out_dtype is not None else (dtype, "dtype")
    if chosen is None:
        return None
    if chosen not in _OUTPUT_DTYPES:
        c.problem(key, f"hubmerge writes bfloat16, float16 or float32, not {chosen}")
        return None
    if dtype is not None and dtype != "float32":
        c.note(
            "dtype",
            f"{dtype}: mergekit casts the inputs to {dtype} when it loads them, and every method but linear and "
            f"slerp computes in it; hubmerge reads them as stored, computes in float32 and rounds once to "
            f"{chosen}, so the results differ by a few {dtype} steps at most",
        )
    elif key == "out_dtype" and dtype is not None:
        c.note("dtype", "float32 is mergekit's load dtype; hubmerge computes in float32 always")
    return chosen, key


def _tokenizer(c: _Converter, data: Mapping[str, Any]) -> tuple[_Ref | str, str] | None:
    """The recipe's [tokenizer] source ("base" or a model) and where it came from; None: the default."""
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        c.problem("tokenizer", "and tokenizer_source are both set; mergekit refuses that too: keep one")
        return None
    key, source = "tokenizer_source", data.get("tokenizer_source")
    table = data.get("tokenizer")
    if table is not None:
        if not isinstance(table, Mapping):
            c.problem("tokenizer", f"must be a mapping with source, got {table!r}")
            return None
        for name in table:
            if name == "tokens":
                c.problem(
                    "tokenizer.tokens",
                    "per-token embedding sources cannot be converted: hubmerge merges the embeddings row by row "
                    "as they are and builds no new tokens; remove it, or merge with mergekit",
                )
            elif name == "pad_to_multiple_of":
                c.problem(
                    "tokenizer.pad_to_multiple_of",
                    "cannot be converted: hubmerge keeps the embeddings' shape (the sources' vocab_size) and does "
                    "not pad them; remove it, or merge with mergekit",
                )
            elif name != "source":
                c.problem(
                    f"tokenizer.{name}",
                    "is not a mergekit tokenizer key (source, tokens, pad_to_multiple_of)",
                )
        key, source = "tokenizer.source", table.get("source", "union")
    if source is None:
        return None
    reshape = (
        "mergekit also rebuilds the embedding rows for that vocabulary (len(tokenizer) rows, e.g. 151665 for "
        "Qwen2.5 instead of 151936); hubmerge keeps the sources' rows, which hold the same values for every token"
    )
    if source == "union":
        c.note(
            key,
            "union: hubmerge builds no union vocabulary; it takes the base's tokenizer (else the first model's), "
            f"the same when every model shares that vocabulary, as the Qwen2.5 family does. {reshape}",
        )
        return None
    c.note(key, f"{source}: {reshape}")
    if source == "base":
        return "base", key
    ref = c.reference(source, key)
    return (ref, key) if ref is not None else None


def _chat_template(c: _Converter, data: Mapping[str, Any]) -> None:
    template = data.get("chat_template")
    if template is None:
        return
    if template == "auto":
        c.note(
            "chat_template",
            "auto: hubmerge keeps the tokenizer source's chat template; mergekit takes the most common one "
            "among the inputs (the same when the tokenizer source has it)",
        )
        return
    c.problem(
        "chat_template",
        "hubmerge sets no chat template of its own: it copies the tokenizer source's; set tokenizer_source to "
        "a model with the template you want and remove chat_template (Qwen2.5 instruct models' templates are "
        "ChatML)",
    )


# --- rendering ------------------------------------------------------------------------------------------


def _line(key: str, value: Any, comment: str) -> str:
    return f"{toml_key(key)} = {toml_value(value)}  # {_comment(comment)}"


def _reference_lines(ref: _Ref) -> list[str]:
    lines = [f"source = {toml_value(ref.source)}"]
    if ref.revision is not None:
        lines.append(f"revision = {toml_value(ref.revision)}")
    return lines


def _render(
    c: _Converter,
    method: Method,
    method_name: Any,
    base: _Ref | None,
    models: Sequence[_Model],
    parameters: Mapping[str, Setting],
    comments: Mapping[str, str],
    dtype: tuple[str, str] | None,
    tokenizer: tuple[_Ref | str, str] | None,
) -> str:
    config = os.path.relpath(c.config.resolve(), c.recipe_dir)
    lines = [f"# Imported by `hubmerge import-mergekit` from the mergekit config {config}."]
    if method.notes:
        lines.append(f"# {method.name}: {_comment(method.notes)}")
    if c.notes:
        lines.append("# Notes on the conversion:")
        lines += [f"#   {_comment(n)}" for n in c.notes]
    lines.append(_line("method", method.name, f"mergekit merge_method: {method_name}"))
    if base is not None:
        value: Any = (
            base.source if base.revision is None else {"source": base.source, "revision": base.revision}
        )
        why = "mergekit base_model" + (
            "" if method.uses_base else f" (for config.json; {method.name} ignores it)"
        )
        lines.append(_line("base", value, why))
    if dtype is not None:
        lines.append(_line("dtype", dtype[0], f"mergekit {dtype[1]}"))
    if parameters:
        lines += ["", "[parameters]"]
        lines += [_line(name, to_json(setting), comments[name]) for name, setting in parameters.items()]
    for model in models:
        lines += ["", f"[[models]]  # mergekit {model.key}", *_reference_lines(model.ref)]
        lines += [
            _line(name, to_json(setting), model.comments[name]) for name, setting in model.params.items()
        ]
    if tokenizer is not None:
        source, key = tokenizer
        lines += ["", f"[tokenizer]  # mergekit {key}"]
        lines += ['source = "base"'] if isinstance(source, str) else _reference_lines(source)
    return "\n".join(lines) + "\n"


def _check(c: _Converter, text: str) -> None:
    """The recipe as `hubmerge validate` will read it beside its folder; a refusal here is a conversion this
    module got wrong or a value only hubmerge refuses (a method's `check_models`)."""
    path = c.recipe_dir / "imported.toml"  # read as if there: it need not exist, and nothing is written
    try:
        loads_recipe(text, path)
    except RecipeError as exc:
        message = str(exc).replace(f"{path}: ", "")
        raise ConfigImportError([f"{c.config}: the converted recipe is not valid: {message}"]) from None
