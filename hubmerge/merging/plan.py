"""The plan: everything that can be known before reading a weight, computed once into a frozen value.

`build_plan` resolves the sources (metadata only), checks that they can be merged, and fixes the output:
tensor list and shapes, where each input tensor comes from (a tied model's `lm_head` is its embedding),
shards, config, dtype, and the memory and disk the merge will need. A dry run prints it and stops; the
engine executes it without taking another decision.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from ..errors import IncompatibleSourcesError, RecipeError
from ..publish.files import INDEX_FILE, SINGLE_FILE, shard_file
from ..recipe.load import Recipe
from ..recipe.reference import ModelRef
from ..sources.budget import Budget, DiskPlan, SourceNeeds, default_budget, plan_disk
from ..sources.checkpoint import DTYPES, ShardLayout, TensorInfo, numel
from ..sources.qwen import Qwen25Size, qwen25_size
from ..sources.resolve import TOKENIZER_FILES, Source, cached_files, resolve
from .methods import Deferral, Select
from .methods.base import Pass
from .schedule import Scalar, Setting, evaluate, layer_position

__all__ = ["CHUNK_ELEMENTS", "MergePlan", "OutputTensor", "Role", "build_plan"]

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
# Elements of one tensor slice the engine holds per input at a time (16 MiB in float32), with up to
# `_SHARED_BY` inputs; with more, each slice shrinks so that all inputs together never hold more than
# CHUNK_ELEMENTS × _SHARED_BY: memory does not grow with the number of models.
CHUNK_ELEMENTS = 1 << 22
_SHARED_BY = 4
# Process baseline measured with torch + transformers imported (see bench/RESULTS.md).
_BASELINE_BYTES = 450 * 2**20
# The card, lock, diagnostics and license written beside the weights: a generous bound.
_CARD_RESERVE = 2**20
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
# Fields that change how the same tensor shapes are read: q_proj is hidden×hidden whatever the head count,
# so only the config can tell that two models split it differently.
_STRUCTURE = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "hidden_act",
)


@dataclass(frozen=True)
class Role:
    """One mention of a source in the recipe: what it is there for, and its own parameters.

    A source mentioned twice (two weights, or the base also among the models) is resolved, downloaded and
    read once and shared by reference; each mention keeps its own `Role`, so nothing downstream has to
    tell mentions apart by the source's label.
    """

    kind: Literal["base", "model", "tokenizer"]
    index: int  # position in `models` for a model, 0 otherwise
    source: Source
    ref: ModelRef  # as this mention wrote it, with its per-model parameters

    @property
    def name(self) -> str:
        """The recipe key of this mention: `base`, `models[1]`, `tokenizer`."""
        return f"models[{self.index}]" if self.kind == "model" else self.kind

    @property
    def params(self) -> Mapping[str, Any]:
        return self.ref.params


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]  # one per math input, in `MergePlan.inputs` order
    # The base's tensor when the method ignores the base but the diagnostics measure task vectors against it.
    stats_base: TensorInfo | None = None
    # The method's parameters resolved for this tensor (gradients and filters evaluated, `schedule.py`):
    # the global ones, and one mapping per model (in `recipe.models` order).
    params: Mapping[str, Scalar] = field(default_factory=dict)
    model_params: tuple[Mapping[str, Scalar], ...] = ()

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def chunk_rows(self) -> int:
        row = self.numel // self.shape[0] if self.shape and self.shape[0] else max(self.numel, 1)
        per_input = CHUNK_ELEMENTS * _SHARED_BY // max(len(self.inputs), _SHARED_BY)
        return max(1, per_input // max(row, 1))


@dataclass(frozen=True)
class Download:
    role: str  # the first mention of the source, e.g. "models[0]"
    reference: str  # as the recipe wrote it
    local: bool  # a local folder: nothing is downloaded
    files: tuple[str, ...]
    bytes: int
    cached_bytes: int


@dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
    roles: tuple[Role, ...]  # every mention in recipe order: base, models, then an explicit tokenizer
    base: Source | None
    models: tuple[Source, ...]
    tokenizer: Source
    config_source: Source
    out_dtype: torch.dtype
    compute_dtype: torch.dtype
    tensors: tuple[OutputTensor, ...]
    shards: tuple[ShardLayout, ...]
    tie_word_embeddings: bool
    config: Mapping[str, Any]
    config_differences: tuple[str, ...]
    qwen25: Qwen25Size | None
    downloads: tuple[Download, ...]
    disk: DiskPlan  # how the run fits its disk budget: cached or streamed sources, shard size, costs
    stats: bool = True  # collect merge diagnostics (diagnostics.py) while merging

    @property
    def inputs(self) -> tuple[Source, ...]:
        """The sources the method's math reads, base first when the method uses one."""
        if self.recipe.method.uses_base and self.base is not None:
            return (self.base, *self.models)
        return self.models

    @property
    def weight_sources(self) -> tuple[Source, ...]:
        """Every source whose weights are read, each once, base first."""
        unique = {s.key: s for s in ((self.base,) if self.base is not None else ()) + self.models}
        return tuple(unique.values())

    @property
    def model_roles(self) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if r.kind == "model")

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def passes(self) -> tuple[Pass, ...]:
        """The statistics passes the engine runs, in order: those the recipe's settings switch on, then the
        method's `settle` pass when the disk plan runs it first."""
        method = self.recipe.method
        active = method.active_passes(self.recipe.parameters, [m.params for m in self.recipe.models])
        return active + ((method.settle,) if self.disk.settle_first and method.settle else ())

    @property
    def rewrites_shards(self) -> bool:
        """Whether the engine may rewrite closed shards after the last one (`methods.Deferred`)."""
        return self.recipe.method.deferral is not None and not self.disk.settle_first

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def peak_memory_estimate(self) -> int:
        return _peak_memory(self.tensors, self.compute_dtype, len(self.inputs), len(self.models), self.stats)

    @property
    def warnings(self) -> tuple[str, ...]:
        notes = list(self.recipe.warnings)
        notes += [
            f"{s.label} stores {HEAD} although its config.json ties it to the embedding; as transformers does, "
            f"the stored {HEAD} is read, and a merge of it is untied"
            for s in self.weight_sources
            if _stores_head(s) and s.config.get("tie_word_embeddings") is True
        ]
        if self.config_differences:
            notes.append(
                f"config.json is taken from {self.config_source.label}; these fields differ between sources: "
                + "; ".join(self.config_differences)
            )
        if not self.recipe.method.uses_base and self.base is not None:
            notes.append(f"the base is not part of {self.recipe.method.name}; it provides config.json")
        return tuple(notes)


def _peak_memory(
    tensors: tuple[OutputTensor, ...], compute_dtype: torch.dtype, inputs: int, models: int, stats: bool
) -> int:
    # Per chunk: every input in the compute dtype, the stacked task vectors and the method's temporaries.
    item = torch.empty(0, dtype=compute_dtype).element_size()
    per_element = 4 * inputs + 8
    if stats:  # diagnostics.py: the base if only it reads it, the task vectors again, masks
        per_element += models + 6
    return _BASELINE_BYTES + _largest_slice(tensors) * item * per_element


def _largest_slice(tensors: tuple[OutputTensor, ...]) -> int:
    """Elements of the largest slice the engine reads of one input."""
    return max(
        min(t.numel, t.chunk_rows * (t.numel // max(t.shape[0], 1) if t.shape else 1)) for t in tensors
    )


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _resolve_all(recipe: Recipe) -> tuple[Role, ...]:
    """One `Role` per mention; a source mentioned twice is resolved once and shared by reference."""
    cache: dict[tuple[object, ...], Source] = {}

    def get(ref: ModelRef, label: str, weights: bool = True) -> Source:
        key = (ref.path, ref.repo_id, ref.revision)  # the same model, whatever its per-model parameters
        if key not in cache or (weights and not cache[key].tensors):
            cache[key] = resolve(ref, label, weights)
        return cache[key]

    roles = [Role("base", 0, get(recipe.base, "base"), recipe.base)] if recipe.base is not None else []
    roles += [Role("model", i, get(m, f"models[{i}]"), m) for i, m in enumerate(recipe.models)]
    if recipe.tokenizer is not None:
        roles.append(
            Role("tokenizer", 0, get(recipe.tokenizer, "tokenizer", weights=False), recipe.tokenizer)
        )
    return tuple(roles)


def _check_compatible(sources: tuple[Source, ...]) -> None:
    first = sources[0]
    for s in sources:
        for key in ("model_type", "architectures"):
            if s.config.get(key) != first.config.get(key):
                raise IncompatibleSourcesError(
                    f"{s.label} is {key} {s.config.get(key)!r} but {first.label} is {first.config.get(key)!r}; "
                    "only models of one architecture can be merged"
                )
        for key in _STRUCTURE:
            if s.config.get(key) != first.config.get(key):
                raise IncompatibleSourcesError(
                    f"{s.label} has {key} = {s.config.get(key)!r} but {first.label} has {first.config.get(key)!r}; "
                    "models of different shapes cannot be merged"
                )
        size = qwen25_size(s.config)
        if size is not None and (
            s.config.get("num_attention_heads"),
            s.config.get("num_key_value_heads"),
        ) != (
            size.heads,
            size.kv_heads,
        ):
            raise IncompatibleSourcesError(
                f"{s.label} has the shape of Qwen2.5-{size.name} but {s.config.get('num_attention_heads')}/"
                f"{s.config.get('num_key_value_heads')} attention/KV heads instead of {size.heads}/{size.kv_heads}; "
                "its config.json does not match its weights' family"
            )
        if HEAD not in s.tensors and s.config.get("tie_word_embeddings") is False:
            raise IncompatibleSourcesError(
                f"{s.label} stores no {HEAD} but its config.json says tie_word_embeddings=false; the checkpoint is "
                "incomplete"
            )
    names = {s.label: set(s.tensors) - {HEAD} for s in sources}
    for s in sources[1:]:
        missing = sorted(names[first.label] - names[s.label], key=_natural_key)
        extra = sorted(names[s.label] - names[first.label], key=_natural_key)
        if missing or extra:
            name, where, other = (missing[0], first, s) if missing else (extra[0], s, first)
            count = len(missing) + len(extra)
            raise IncompatibleSourcesError(
                f"tensor {name} is in {where.label} but not in {other.label} ({count} tensor names differ); "
                "these models have different architectures"
            )
    # lm_head as each source is read (its embedding when tied) passes the same dtype and shape checks.
    heads = [HEAD] if EMBED in names[first.label] else []
    for name in [*sorted(names[first.label], key=_natural_key), *heads]:
        for s in sources:
            info = _input(s, name)
            if info.dtype not in DTYPES:
                raise IncompatibleSourcesError(
                    f"{s.label}: tensor {name} has dtype {info.dtype}; hubmerge merges float tensors only"
                )
            if info.shape != _input(first, name).shape:
                raise IncompatibleSourcesError(
                    f"tensor {name} has shape {list(_input(first, name).shape)} in {first.label} but "
                    f"{list(info.shape)} in {s.label}; the vocabularies or sizes differ, so these models cannot be merged"
                )


def _stores_head(source: Source) -> bool:
    """Whether transformers reads `lm_head` from the file: whenever it is stored. transformers 5 keeps a stored
    `lm_head` that differs from the embedding even under `tie_word_embeddings: true` (and unties the model);
    where they are equal, tied or not reads the same values."""
    return HEAD in source.tensors


def _input(source: Source, name: str) -> TensorInfo:
    """The stored tensor that `name` is read from: a tied model's `lm_head` is its embedding."""
    return source.tensors[EMBED if name == HEAD and not _stores_head(source) else name]


def _first_mentions(roles: tuple[Role, ...]) -> tuple[Role, ...]:
    """Each source once, named by its first mention."""
    first: dict[str, Role] = {}
    for role in roles:
        first.setdefault(role.source.key, role)
    return tuple(first.values())


def _config_differences(roles: tuple[Role, ...]) -> tuple[str, ...]:
    keys = sorted(set().union(*(r.source.config for r in roles)) - _CONFIG_NOISE)
    found = []
    for key in keys:
        values = [r.source.config.get(key) for r in roles]
        if any(v != values[0] for v in values):
            found.append(
                f"{key} (" + ", ".join(f"{r.name}: {v!r}" for r, v in zip(roles, values, strict=True)) + ")"
            )
    return tuple(found)


def _dtype_named(config: Mapping[str, Any]) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) and value in DTYPES.values() else None


def _shards(tensors: tuple[OutputTensor, ...], dtype: torch.dtype, max_bytes: int) -> tuple[ShardLayout, ...]:
    item = torch.empty(0, dtype=dtype).element_size()
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel * item
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    if len(groups) == 1:
        names = [SINGLE_FILE]
    else:
        names = [shard_file(i + 1, len(groups)) for i in range(len(groups))]
    return tuple(
        ShardLayout(name, tuple((t.name, t.shape) for t in group), dtype)
        for name, group in zip(names, groups, strict=True)
    )


def _downloads(roles: tuple[Role, ...], tokenizer: Source) -> tuple[Download, ...]:
    result = []
    seen: set[str] = set()
    for role in roles:
        source = role.source
        if source.key in seen:  # listed twice, fetched once
            continue
        seen.add(source.key)
        files = source.needed_files(weights=bool(source.tensors), tokenizer=source is tokenizer)
        cached = cached_files(source, files)
        result.append(
            Download(
                role.name,
                role.ref.text,
                source.ref.is_local,
                files,
                sum(source.files.get(f, 0) for f in files),
                sum(source.files.get(f, 0) for f in files if f in cached),
            )
        )
    return tuple(result)


def _needs(roles: tuple[Role, ...], tokenizer: Source) -> tuple[SourceNeeds, ...]:
    """Each source once (by its first mention): its weight files and its other files, and what is cached."""
    result = []
    for role in _first_mentions(roles):
        source = role.source
        files = source.needed_files(weights=bool(source.tensors), tokenizer=source is tokenizer)
        cached = cached_files(source, files)
        # The index is downloaded whole in every strategy: it is one of the small files.
        weights = {f for f in source.weight_files if f != INDEX_FILE} if source.tensors else set()

        sizes = {f: source.files.get(f, 0) for f in files}
        weight_bytes = sum(n for f, n in sizes.items() if f in weights)
        other_bytes = sum(sizes.values()) - weight_bytes
        weight_cached = sum(n for f, n in sizes.items() if f in weights and f in cached)
        other_cached = sum(n for f, n in sizes.items() if f in cached) - weight_cached
        result.append(
            SourceNeeds(
                role.name,
                source.ref.is_local,
                weight_bytes=weight_bytes,
                weight_cached=weight_cached,
                other_bytes=other_bytes,
                other_cached=other_cached,
            )
        )
    return tuple(result)


def _shard_size_set(recipe: Recipe) -> bool:
    """Whether the recipe chose `[output] max_shard_size` (else the disk plan may choose a smaller one)."""
    try:
        data = tomllib.loads(recipe.text)
    except tomllib.TOMLDecodeError:  # a recipe pinned by a lock, already validated: never reached
        return True
    output = data.get("output")
    return isinstance(output, dict) and "max_shard_size" in output


def _disk_plan(
    recipe: Recipe,
    roles: tuple[Role, ...],
    tokenizer: Source,
    tensors: tuple[OutputTensor, ...],
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    inputs: int,
    delete_uploaded: bool,
) -> DiskPlan:
    from huggingface_hub import constants

    out = recipe.output
    budget = (
        Budget(out.max_disk, "--max-disk or [output] max_disk")
        if out.max_disk is not None
        else default_budget(Path(constants.HF_HUB_CACHE), out.dir)
    )
    item = torch.empty(0, dtype=out_dtype).element_size()
    stored = max(DTYPES[i.dtype].itemsize for t in tensors for i in t.inputs)
    side = sum(tokenizer.files.get(f, 0) for f in TOKENIZER_FILES) + len(recipe.text) + _CARD_RESERVE
    if out.gguf:  # written after the weights, from them: beside them or in the companion folder
        from ..gguf.writer import estimate_size

        shapes = {t.name: t.shape for t in tensors}
        side += sum(estimate_size(shapes, t, tokenizer.files.get("tokenizer.json", 0)) for t in out.gguf)
    models = sum(r.kind == "model" for r in roles)
    return plan_disk(
        _needs(roles, tokenizer),
        budget=budget,
        output_bytes=sum(t.numel for t in tensors) * item,
        side_bytes=side,
        largest_tensor=max(t.numel for t in tensors) * item,
        max_shard_size=out.max_shard_size,
        shard_size_set=_shard_size_set(recipe),
        push=out.repo is not None,
        offline=constants.HF_HUB_OFFLINE,
        reads=_reads(recipe),
        verify=out.verify_streamed,
        memory=_peak_memory(tensors, compute_dtype, inputs, models, out.stats),
        slice_bytes=_largest_slice(tensors) * stored,
        scratch_bytes=_scratch_bytes(recipe.method.deferral, tensors, item),
        settle=recipe.method.settle is not None,
        delete_uploaded=delete_uploaded,
    )


def _scratch_bytes(deferral: Deferral | None, tensors: tuple[OutputTensor, ...], item: int) -> int:
    """The estimate of the engine's scratch file of open positions (`engine._Patches`): 8 bytes of position
    and one value per alternative each, for the method's expected share of the positions
    (`Deferral.open_percent`)."""
    if deferral is None:
        return 0
    return sum(t.numel for t in tensors) * (8 + deferral.alternatives * item) * deferral.open_percent // 100


def _reads(recipe: Recipe) -> int:
    """How many times the merge reads every input byte, as the disk plan counts network bytes: once per
    active pass and once to merge, and one more per selection for its sample (a whole small model; on a
    big one a sliver, which leaves room for the two reads more where a sampled bracket misses,
    `selection.py`). A model-wide selection pass, its sample and the merge: 3, as measured on streamed tiny
    repos (bench/RESULTS.md)."""
    settings = [m.params for m in recipe.models]
    passes = recipe.method.active_passes(recipe.parameters, settings)
    return recipe.method.reads(recipe.parameters, settings) + sum(isinstance(p, Select) for p in passes)


# config.json fields that belong to the tokenizer: the special token ids generation stops and pads on.
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _stats_base(recipe: Recipe, base: Source | None, name: str) -> TensorInfo | None:
    # Task vectors are θᵢ − θ_base for every method: a method that ignores the base (simple_average, linear)
    # still has it downloaded for config.json, so the diagnostics read it as one more input (only when they
    # are collected: `MergePlan.stats` or `hubmerge inspect`).
    if base is None or recipe.method.uses_base:
        return None
    return _input(base, name)


def _setting_value(
    settings: list[Mapping[str, Setting]], name: str, tensor: str, t: float, default: Scalar | None
) -> Scalar | None:
    """The first setting in `settings` (most specific first) with a value for `tensor`, else the default."""
    for table in settings:
        if name in table:
            value = evaluate(table[name], tensor, t)
            if value is not None:
                return value
    return default


def _tensor_params(
    recipe: Recipe, name: str, input_names: tuple[str, ...], num_layers: int
) -> tuple[dict[str, Scalar], tuple[dict[str, Scalar], ...]]:
    """Every parameter of the method for tensor `name`: model's own setting, then `[parameters]`, then the
    method's default (mergekit's order). Per-model filters match the name of the tensor read from that
    model (`input_names`, one per model), global ones the output tensor's name."""
    method = recipe.method
    t = layer_position(name, num_layers)
    params: dict[str, Scalar] = {}
    for p in method.params:
        value = _setting_value([recipe.parameters], p.name, name, t, p.default)
        if value is None:
            raise RecipeError(
                f"{recipe.path}: parameters.{p.name}: no value for tensor {name} (no filter matches it); add a "
                "rule without a filter"
            )
        params[p.name] = p.cast(value)
    per_model = []
    for i, (model, input_name) in enumerate(zip(recipe.models, input_names, strict=True)):
        values: dict[str, Scalar] = {}
        for p in method.model_params:
            value = _setting_value([model.params, recipe.parameters], p.name, input_name, t, p.default)
            if value is None:
                raise RecipeError(
                    f"{recipe.path}: models[{i}].{p.name}: no value for tensor {input_name} (no filter matches it); add a rule "
                    "without a filter, or a default in [parameters]"
                )
            values[p.name] = p.cast(value)
        problem = method.check(values) if method.check is not None else None
        if problem:
            raise RecipeError(f"{recipe.path}: models[{i}]: {problem} (tensor {input_name})")
        per_model.append(values)
    return params, tuple(per_model)


def build_plan(recipe: Recipe, *, delete_uploaded: bool = False) -> MergePlan:
    """Resolve the recipe's sources (metadata only) and decide everything the merge will do.

    `delete_uploaded`: each output shard is deleted once uploaded, whether or not the output would fit
    the disk budget (with a push; see `budget.plan_disk`)."""
    roles = _resolve_all(recipe)
    base = next((r.source for r in roles if r.kind == "base"), None)
    models = tuple(r.source for r in roles if r.kind == "model")
    tokenizer = next((r.source for r in roles if r.kind == "tokenizer"), base or models[0])
    weight_roles = tuple(r for r in roles if r.kind != "tokenizer")
    weight_sources = tuple({r.source.key: r.source for r in weight_roles}.values())
    _check_compatible(weight_sources)
    with_base = recipe.method.uses_base and base is not None
    inputs = ((base,) if with_base and base is not None else ()) + models

    tied = not any(_stores_head(s) for s in inputs)
    names = sorted(set(inputs[0].tensors) - {HEAD}, key=_natural_key) + ([] if tied else [HEAD])
    num_layers = int(inputs[0].config.get("num_hidden_layers") or 1)
    planned = []
    for name in names:
        infos = tuple(_input(s, name) for s in inputs)
        params, model_params = _tensor_params(
            recipe, name, tuple(i.name for i in infos[1 if with_base else 0 :]), num_layers
        )
        planned.append(
            OutputTensor(
                name,
                _input(inputs[0], name).shape,
                infos,
                _stats_base(recipe, base, name),
                params,
                model_params,
            )
        )
    tensors = tuple(planned)
    if not tied and any(
        t.inputs[0].shape != t.shape or any(i.shape != t.shape for i in t.inputs) for t in tensors
    ):
        raise IncompatibleSourcesError(f"{HEAD} and {EMBED} have different shapes across sources")

    config_source = base or models[0]
    out_dtype = (
        getattr(torch, recipe.dtype)
        if recipe.dtype
        else _dtype_named(config_source.config) or DTYPES[next(iter(config_source.tensors.values())).dtype]
    )
    compute_dtype = (
        torch.float64 if any(i.dtype == "F64" for t in tensors for i in t.inputs) else torch.float32
    )
    config = copy.deepcopy(dict(config_source.config))
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = str(
        out_dtype
    ).removeprefix("torch.")
    config["tie_word_embeddings"] = tied
    # The tokens generation stops on belong with the tokenizer and chat template (an instruct model's
    # <|im_end|>), so they come from the tokenizer source, as generation_config.json does.
    for key in _TOKEN_IDS:
        if key in tokenizer.config:
            config[key] = copy.deepcopy(tokenizer.config[key])
        else:
            config.pop(key, None)
    disk = _disk_plan(recipe, roles, tokenizer, tensors, out_dtype, compute_dtype, len(inputs), delete_uploaded)
    return MergePlan(
        recipe=recipe,
        roles=roles,
        base=base,
        models=models,
        tokenizer=tokenizer,
        config_source=config_source,
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
        tensors=tensors,
        shards=_shards(tensors, out_dtype, disk.max_shard_size),
        tie_word_embeddings=tied,
        config=config,
        config_differences=_config_differences(_first_mentions(weight_roles)),
        qwen25=qwen25_size(config_source.config),
        downloads=_downloads(roles, tokenizer),
        disk=disk,
        stats=recipe.output.stats,
    )
