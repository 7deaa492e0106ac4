"""The plan: everything that can be known before reading a weight, computed once into a frozen value.

`build_plan` resolves the sources (metadata only), checks that they can be merged, and fixes the output:
tensor list and shapes, where each input tensor comes from (a tied model's `lm_head` is its embedding),
shards, config, dtype, and the memory and disk the merge will need. A dry run prints it and stops; the
engine executes it without taking another decision.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import DTYPES, ShardLayout, TensorInfo, numel
from .errors import IncompatibleSourcesError
from .qwen import Qwen25Size, qwen25_size
from .recipe import ModelRef, Recipe
from .sources import Source, cached_files, resolve

__all__ = ["CHUNK_ELEMENTS", "MergePlan", "OutputTensor", "build_plan"]

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
# Elements of one tensor slice the engine holds per input at a time (16 MiB in float32).
CHUNK_ELEMENTS = 1 << 22
# Process baseline measured with torch + transformers imported (see bench/RESULTS.md).
_BASELINE_BYTES = 450 * 2**20
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
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]  # one per math input, in `MergePlan.inputs` order
    # The base's tensor when the method ignores the base but the diagnostics measure task vectors against it.
    stats_base: TensorInfo | None = None

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def chunk_rows(self) -> int:
        row = self.numel // self.shape[0] if self.shape and self.shape[0] else max(self.numel, 1)
        return max(1, CHUNK_ELEMENTS // max(row, 1))


@dataclass(frozen=True)
class Download:
    source: str  # label
    files: tuple[str, ...]
    bytes: int
    cached_bytes: int


@dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
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
    stats: bool = True  # collect merge diagnostics (diagnostics.py) while merging

    @property
    def inputs(self) -> tuple[Source, ...]:
        """The sources the method's math reads, base first when the method uses one."""
        if self.recipe.method.needs_base:
            assert self.base is not None
            return (self.base, *self.models)
        return self.models

    @property
    def weight_sources(self) -> tuple[Source, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def peak_memory_estimate(self) -> int:
        # Per chunk: every input in the compute dtype, the stacked task vectors and the method's temporaries.
        item = torch.empty(0, dtype=self.compute_dtype).element_size()
        largest = max(
            min(t.numel, t.chunk_rows * (t.numel // max(t.shape[0], 1) if t.shape else 1))
            for t in self.tensors
        )
        per_element = 4 * len(self.inputs) + 8
        if self.stats:  # diagnostics.py: the base if only it reads it, the task vectors again, masks
            per_element += len(self.models) + 6
        return _BASELINE_BYTES + largest * item * per_element

    @property
    def warnings(self) -> tuple[str, ...]:
        notes = []
        if self.config_differences:
            notes.append(
                f"config.json is taken from {self.config_source.label}; these fields differ between sources: "
                + "; ".join(self.config_differences)
            )
        if self.recipe.method.name in ("simple_average", "linear") and self.base is not None:
            notes.append(
                f"the base is not part of {self.recipe.method.name} (as in FusionBench); it provides config.json"
            )
        return tuple(notes)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _resolve_all(recipe: Recipe) -> tuple[Source | None, tuple[Source, ...], Source]:
    cache: dict[tuple[object, ...], Source] = {}

    def get(ref: ModelRef, label: str, weights: bool = True) -> Source:
        key = (ref.path, ref.repo_id, ref.revision)  # the same model, whatever its per-model parameters
        if key not in cache or (weights and not cache[key].tensors):
            cache[key] = resolve(ref, label, weights)
        return cache[key]

    base = get(recipe.base, "base") if recipe.base is not None else None
    models = tuple(get(m, f"models[{i}]") for i, m in enumerate(recipe.models))
    tokenizer = get(recipe.tokenizer, "tokenizer", weights=False) if recipe.tokenizer else (base or models[0])
    return base, models, tokenizer


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
        stores_head = HEAD in s.tensors
        if not stores_head and s.config.get("tie_word_embeddings") is False:
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
    for name in sorted(names[first.label], key=_natural_key):
        for s in sources:
            info = s.tensors[name]
            if info.dtype not in DTYPES:
                raise IncompatibleSourcesError(
                    f"{s.label}: tensor {name} has dtype {info.dtype}; hubmerge merges float tensors only"
                )
            if info.shape != first.tensors[name].shape:
                raise IncompatibleSourcesError(
                    f"tensor {name} has shape {list(first.tensors[name].shape)} in {first.label} but "
                    f"{list(info.shape)} in {s.label}; the vocabularies or sizes differ, so these models cannot be merged"
                )


def _config_differences(sources: tuple[Source, ...]) -> tuple[str, ...]:
    keys = sorted(set().union(*(s.config for s in sources)) - _CONFIG_NOISE)
    found = []
    for key in keys:
        values = [s.config.get(key) for s in sources]
        if any(v != values[0] for v in values):
            found.append(
                f"{key} ("
                + ", ".join(f"{s.label.split(' ')[0]}: {v!r}" for s, v in zip(sources, values, strict=True))
                + ")"
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
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return tuple(
        ShardLayout(name, tuple((t.name, t.shape) for t in group), dtype)
        for name, group in zip(names, groups, strict=True)
    )


def _downloads(base: Source | None, models: tuple[Source, ...], tokenizer: Source) -> tuple[Download, ...]:
    result = []
    seen: set[int] = set()
    for source in ((base,) if base else ()) + models + (tokenizer,):
        if id(source) in seen:
            continue
        seen.add(id(source))
        files = source.needed_files(weights=bool(source.tensors), tokenizer=source is tokenizer)
        cached = cached_files(source, files)
        result.append(
            Download(
                source.label,
                files,
                sum(source.files.get(f, 0) for f in files),
                sum(source.files.get(f, 0) for f in files if f in cached),
            )
        )
    return tuple(result)


def _stats_base(recipe: Recipe, base: Source | None, name: str) -> TensorInfo | None:
    # Task vectors are θᵢ − θ_base for every method: a method that ignores the base (simple_average, linear)
    # still has it downloaded for config.json, so the diagnostics read it as one more input (only when they
    # are collected: `MergePlan.stats` or `hubmerge inspect`).
    if base is None or recipe.method.needs_base:
        return None
    return base.tensors[EMBED if name == HEAD and HEAD not in base.tensors else name]


def build_plan(recipe: Recipe) -> MergePlan:
    """Resolve the recipe's sources (metadata only) and decide everything the merge will do."""
    base, models, tokenizer = _resolve_all(recipe)
    weight_sources = ((base,) if base is not None else ()) + models
    _check_compatible(weight_sources)
    inputs = ((base,) if recipe.method.needs_base and base is not None else ()) + models

    heads_stored = [HEAD in s.tensors for s in inputs]
    tied = not any(heads_stored)
    names = sorted(set(inputs[0].tensors) - {HEAD}, key=_natural_key) + ([] if tied else [HEAD])
    tensors = tuple(
        OutputTensor(
            name,
            inputs[0].tensors[EMBED if name == HEAD and HEAD not in inputs[0].tensors else name].shape,
            tuple(s.tensors[EMBED if name == HEAD and HEAD not in s.tensors else name] for s in inputs),
            _stats_base(recipe, base, name),
        )
        for name in names
    )
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
    return MergePlan(
        recipe=recipe,
        base=base,
        models=models,
        tokenizer=tokenizer,
        config_source=config_source,
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
        tensors=tensors,
        shards=_shards(tensors, out_dtype, recipe.output.max_shard_size),
        tie_word_embeddings=tied,
        config=config,
        config_differences=_config_differences(weight_sources),
        qwen25=qwen25_size(config_source.config),
        downloads=_downloads(base, models, tokenizer),
        stats=recipe.output.stats,
    )
