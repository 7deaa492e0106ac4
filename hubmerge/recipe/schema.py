"""The recipe's schema: pydantic models of its tables, one recipe model per registered method, and the
JSON Schema editors read (`hubmerge schema`).

A method's `Param`s (`merging/methods/base.py`) become its `[parameters]` keys and the keys of its `[[models]]`
tables, with their types, ranges, choices, defaults and help; a `per_tensor` parameter also takes a
gradient or filter rules (`schedule.py`), converted here to `Gradient` and `Filter` values. The recipe is a
union tagged by `method`, so a method added to the registry is validated, and described to editors,
without a change here. The [output], [card] and [eval] tables are the recipe's own values: their validators
resolve paths from the recipe file (`validate`'s context) and check what joins their keys. `validate` turns
pydantic's first error into a key path (`models[1].weight`) and one message a recipe author can act on, with
"did you mean" for typos; `parse_setting` reads and words one parameter's setting alone the same way (the
mergekit importer's parser). It imports no torch.
"""

from __future__ import annotations

import difflib
import functools
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from ..merging.methods import METHODS, Method, Param
from ..merging.schedule import Filter, Gradient, Setting, evaluate
from ..sources.qwen import ALWAYS_PRESENT

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

__all__ = [
    "DTYPES",
    "CardTable",
    "EvalTable",
    "OutputTable",
    "Problem",
    "Requirement",
    "given",
    "is_repo_id",
    "json_schema",
    "model_settings",
    "parse_setting",
    "parse_size",
    "resolve_path",
    "validate",
]

DTYPES = ("bfloat16", "float16", "float32")
# Hub repo ids: `name` or `namespace/name`, as huggingface_hub validates them (with `is_repo_id`).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9_.\-]{1,96}/)?[A-Za-z0-9_.\-]{1,96}$")
# Written without flags, so that the JSON Schema (ECMA-262) pattern means the same.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KkMmGgTt][Ii]?[Bb]|[Bb])?\s*$")
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_DEVICE = re.compile(r"^(?:cpu|mps|cuda(?::\d+)?)$")
RELATIVE_SCORE = re.compile(r"^\s*(base|best_source)\s*(?:([+-])\s*(\d+(?:\.\d+)?)\s*)?$")


def parse_size(value: int | str) -> int:
    """`"5GB"` → 5·10⁹ bytes (decimal units, as transformers' max_shard_size; KiB/MiB/GiB are binary)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f'must be a size such as "5GB", "500MB" or a number of bytes, got {value!r}')
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return size


def is_repo_id(name: str) -> bool:
    """Whether `name` is a Hub repo id (`name` or `namespace/name`) that huggingface_hub accepts."""
    return _REPO_ID.match(name) is not None and "--" not in name and ".." not in name


def resolve_path(text: str, root: Path) -> Path:
    """`text` as an absolute path, relative to `root`; ValueError for a name the system refuses."""
    try:
        path = (root / Path(text).expanduser()).resolve()
        path.exists()  # raises for a name the system refuses (too long), which later checks would not expect
        return path
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, an unknown ~user, a name too long
        raise ValueError(f"{text!r} is not a usable path ({exc})") from None


@dataclass(frozen=True)
class Requirement:
    """One `[eval] require` entry: the merge's primary score on `task` must reach a threshold.

    Either an absolute `threshold` (`gsm8k = 0.40`), or a `reference` model's score moved by `offset` in the
    metric's better direction (`"best_source - 0.02"`: at most 0.02 worse than the best source; `"base"`: at
    least as good as the base). For a lower-is-better metric, better means lower.
    """

    task: str
    text: str  # as written, for messages and the card
    threshold: float | None = None
    reference: str | None = None  # "base" or "best_source"
    offset: float = 0.0


# --- the schema ---------------------------------------------------------------------------------------------


def _problem(message: str, at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validator's error, kept word for word as the message after the key path; `at`: the keys below the
    validated value that the message is about (`output` + `("create_pr",)`)."""
    return PydanticCustomError("recipe", "{message}", {"message": message, "at": at})


def _recipe_file(info: ValidationInfo) -> Path:
    """The recipe file being validated (`validate`'s context): relative paths are read from its folder."""
    context = info.context or {}
    if "recipe" not in context:
        raise TypeError("validate the recipe with schema.validate, which gives its file")  # a bug, not input
    return Path(context["recipe"])


def _local_path(value: Any, info: ValidationInfo, what: str) -> Path | None:
    """A path key (`card.template`, `eval.include_path`): relative to the recipe's folder; "" is absent."""
    if not isinstance(value, str):
        raise _problem(f"must be a string, got {value!r}")
    if not value:
        return None
    try:
        path = resolve_path(value, _recipe_file(info).parent)
    except ValueError as exc:
        raise _problem(str(exc)) from None
    if not (path.is_dir() if what == "folder" else path.is_file()):
        where = " (relative to the recipe)" if what == "folder" else ""
        raise _problem(f"no such {what} {path}{where}")
    return path


class _Table(BaseModel):
    """A TOML table: strict types (no "1" for 1), and an unknown key names the closest known one."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known:
                    raise PydanticCustomError("unknown_key", "unknown key", {"key": key, "known": known})
        return data


def given(table: BaseModel) -> dict[str, Any]:
    """The keys a table sets, by their TOML names, with their validated values."""
    fields = type(table).model_fields
    return {fields[name].alias or name: getattr(table, name) for name in table.model_fields_set}


def model_settings(entry: str | BaseModel) -> dict[str, Setting]:
    """The per-model parameters a `models` entry (a reference string or a [[models]] table) sets."""
    if isinstance(entry, str):
        return {}
    return {k: v for k, v in given(entry).items() if k not in ("source", "revision")}


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A validator from a function that raises ValueError with the message."""

    def validate(value: Any) -> Any:
        try:
            return check(value)
        except ValueError as exc:
            raise _problem(str(exc)) from None

    return validate


def _repo(value: str) -> str:
    if "/" not in value or not is_repo_id(value):
        raise ValueError(f'{value!r} is not a Hub repo id like "your-name/Qwen2.5-1.5B-TIES"')
    return value


def _device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f'must be "cpu", "cuda", "cuda:N" or "mps", got {value!r}')
    return value


def _limit(value: float) -> int | float:
    if value >= 1 and value.is_integer():
        return int(value)
    if not 0 < value < 1:
        raise ValueError(f"must be a number of examples (>= 1) or a fraction below 1, got {value!r}")
    return value


def _score(value: Any) -> float | str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not RELATIVE_SCORE.match(value):
        raise ValueError(
            f'must be a score such as 0.40, or "best_source", "best_source - 0.02", "base", "base + 0.01"; got {value!r}'
        )
    return " ".join(value.split())


def _languages(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _problem(f'must be a language code such as "en" or a list of them, got {value!r}')
    return value


def _tasks(value: Any) -> tuple[str, ...]:
    """`eval.tasks`, each once, stripped; () when absent (required beside other keys: `EvalTable`)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _problem(f"must be a list, got {value!r}")
    for i, task in enumerate(value):
        if not isinstance(task, str):
            raise _problem(f"must be a string, got {task!r}", (i,))
    if not value or not all(t.strip() for t in value):
        raise _problem('must be a non-empty list of lm-eval task names, e.g. ["gsm8k"]')
    return tuple(dict.fromkeys(t.strip() for t in value))


def _requirements(value: Any, info: ValidationInfo) -> tuple[Requirement, ...]:
    """`eval.require`: one `Requirement` per task, each task one of `eval.tasks`."""
    if not isinstance(value, dict):
        raise _problem(f"must be a table, got {value!r}")
    tasks = info.data.get("tasks")
    require = []
    for task, written in value.items():
        try:
            score = _score(written)
        except ValueError as exc:
            raise _problem(str(exc), (task,)) from None
        if tasks and task not in tasks:  # () when absent: EvalTable says tasks is required
            raise _problem(f"is not one of eval.tasks ({', '.join(tasks)})", (task,))
        if isinstance(score, float):
            require.append(Requirement(task, str(score), threshold=score))
            continue
        reference, sign, amount = RELATIVE_SCORE.match(score).groups()  # type: ignore[union-attr]
        offset = float(amount or 0) * (-1 if sign == "-" else 1)
        require.append(Requirement(task, score, reference=reference, offset=offset))
    return tuple(require)


_NonEmpty = Annotated[str, Field(min_length=1)]
# A TOML list read into a tuple: strict pydantic takes only a tuple for a tuple, so the tuple is lax and its
# items strict.
_NonEmptyTuple = Annotated[tuple[Annotated[_NonEmpty, Strict()], ...], Strict(False)]
_GGUFTuple = Annotated[
    tuple[Literal["q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32"], ...],
    Strict(False),
]


def _output_dir(value: Any, info: ValidationInfo) -> Path:
    """`output.dir` resolved: `--output` (`validate`'s context, already resolved) over `dir`, relative to the
    recipe's folder, over outputs/<recipe file stem> in the working directory."""
    if value is not None and not isinstance(value, str):
        raise _problem(f"must be a string, got {value!r}")
    recipe = _recipe_file(info)
    override = (info.context or {}).get("output_dir")
    if override is not None:
        return Path(override)
    if value is None:
        return (Path.cwd() / "outputs" / recipe.stem).resolve()
    try:
        return resolve_path(value, recipe.parent)
    except ValueError as exc:
        raise _problem(str(exc)) from None


def _card_template(value: Any, info: ValidationInfo) -> Path | None:
    template = _local_path(value, info, "template file")
    if template is not None and not template.is_relative_to(_recipe_file(info).parent.resolve()):
        # Rendered in pull-request checks and copied into the published output: it must be the recipe's own.
        raise _problem(
            f"{template} is outside the recipe's folder; keep the template beside the recipe or below it"
        )
    return template


def _include_path(value: Any, info: ValidationInfo) -> Path | None:
    return _local_path(value, info, "folder")


_Size = Annotated[
    int,
    PlainValidator(
        _checked(parse_size),
        json_schema_input_type=Annotated[int, Field(gt=0)] | Annotated[str, Field(pattern=_SIZE.pattern)],
    ),
]


class SourceTable(_Table):
    """A model named by a table: a Hub id or a local folder, and a revision for a Hub id."""

    source: str = Field(description='a Hub id such as "Qwen/Qwen2.5-1.5B", "id@revision", or a local folder')
    revision: str | None = Field(
        None, description="a Hub branch, tag or commit sha (resolved to a sha before anything else)"
    )


class TokenizerTable(_Table):
    """[tokenizer]: tokenizer files, chat template, generation_config.json and config.json's token ids."""

    source: str | None = Field(
        None,
        description='"base" (the default: the base, else the first model) or a model reference, e.g. the '
        "instruct model for a chat-capable merge",
    )
    revision: str | None = Field(None, description="a Hub branch, tag or commit sha")


class OutputTable(_Table):
    """[output]: where the merge is written and pushed."""

    dir: Annotated[Path, PlainValidator(_output_dir, json_schema_input_type=str | None)] = Field(
        None,
        validate_default=True,
        description="the output folder, relative to the recipe file; default: outputs/<recipe file stem> "
        "relative to the working directory",
    )
    repo: (
        Annotated[
            str,
            AfterValidator(_checked(_repo)),
            Field(json_schema_extra={"pattern": r"^[A-Za-z0-9_.\-]{1,96}/[A-Za-z0-9_.\-]{1,96}$"}),
        ]
        | None
    ) = Field(
        None, description='the Hub repo to push to, e.g. "your-name/Qwen2.5-1.5B-TIES"; absent: no push'
    )
    private: bool | None = Field(None, description="create the Hub repo private")
    branch: str | None = Field(None, description="the pushed branch (created from main if missing)")
    create_pr: bool = Field(False, description="open a pull request instead of committing to the branch")

    @field_validator("create_pr")
    @classmethod
    def _pr_targets_main(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("branch") not in (None, "main"):
            raise _problem("a pull request targets main; drop 'branch' or 'create_pr'")
        return value

    max_shard_size: _Size = Field(
        "5GB",
        validate_default=True,
        description='largest safetensors shard: bytes, or decimal units as transformers ("500MB"); '
        "KiB/MiB/GiB are binary",
    )
    max_disk: _Size | None = Field(None, description='the most disk the output may take, e.g. "20GB"')
    stats: bool = Field(True, description="merge diagnostics: merge_stats.json and plots (false: off)")
    verify_streamed: bool = Field(
        True,
        description="prove every byte read from a streamed source against the Hub's sha256 (costs up to one "
        "more read of each streamed file); false: sizes and headers only, recorded in the lock",
    )
    gguf: Annotated[
        _GGUFTuple,
        AfterValidator(lambda types: tuple(dict.fromkeys(types))),  # each type once, in the order written
    ] = Field(
        (), description='GGUF files (llama.cpp, Ollama, LM Studio) written after the weights, e.g. ["q4_k_m"]'
    )
    gguf_repo: (
        Annotated[
            str, Field(json_schema_extra={"pattern": r"^(same|[A-Za-z0-9_.\-]{1,96}/[A-Za-z0-9_.\-]{1,96})$"})
        ]
        | None
    ) = Field(
        None,
        validate_default=True,
        description='push the GGUF files to this repo, or "same" (beside the weights); default: {repo}-GGUF',
    )

    @field_validator("gguf_repo")
    @classmethod
    def _gguf_repo(cls, value: str | None, info: ValidationInfo) -> str | None:
        """The repo the GGUF files are pushed to: None unless `repo` is set and `gguf` is not empty."""
        repo, gguf = info.data.get("repo"), info.data.get("gguf")
        if not (repo and gguf):
            return None
        return repo if value == "same" else value or f"{repo}-GGUF"

    @property
    def gguf_dir(self) -> Path:
        """Where the GGUF files are written: the output folder when they go beside the weights, else a
        companion folder `{dir}-GGUF` with its own card."""
        return self.dir if self.gguf_repo == self.repo else self.dir.with_name(self.dir.name + "-GGUF")


class CardTable(_Table):
    """[card]: model card (README.md) options."""

    template: Annotated[Path | None, PlainValidator(_card_template, json_schema_input_type=str | None)] = (
        Field(None, description="a Jinja template replacing the default; in the recipe's folder or below")
    )
    title: str | None = Field(None, description="the card's title")
    description: str | None = Field(None, description="a paragraph under the title")
    tags: _NonEmptyTuple = Field((), description="Hub tags added to the card's metadata")
    language: Annotated[
        _NonEmptyTuple,
        BeforeValidator(_languages, json_schema_input_type=_NonEmpty | list[_NonEmpty]),
    ] = Field((), description='languages of the model, e.g. "en" or ["en", "zh"]')
    license: str | None = Field(None, description="required only when a source's license is unknown")
    license_name: str | None = Field(None, description='the license\'s name when license = "other"')
    license_link: str | None = Field(None, description='a link to the license when license = "other"')


class EvalTable(_Table):
    """[eval]: evaluation with lm-evaluation-harness (pip install "hubmerge[eval]")."""

    tasks: Annotated[tuple[str, ...], PlainValidator(_tasks, json_schema_input_type=list[str] | None)] = (
        Field(
            None,
            validate_default=True,
            description="lm-eval task names; required in an [eval] table with other keys than sanity",
        )
    )
    limit: Annotated[float, AfterValidator(_checked(_limit))] | None = Field(
        None,
        json_schema_extra={"exclusiveMinimum": 0},
        description="examples per task (a number below 1: a fraction); default all",
    )
    num_fewshot: Annotated[int, Field(ge=0)] | None = Field(
        None, description="few-shot examples; default: each task's own"
    )
    batch_size: int = Field(1, ge=1)
    include_path: Annotated[Path | None, PlainValidator(_include_path, json_schema_input_type=str | None)] = (
        Field(None, description="a folder of custom task YAMLs, relative to the recipe")
    )
    device: Annotated[str, AfterValidator(_checked(_device))] = Field(
        "cpu", json_schema_extra={"pattern": _DEVICE.pattern}, description="cpu, cuda, cuda:N or mps"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: the checkpoint's own dtype"
    )
    sources: bool = Field(True, description="also evaluate the base and every model (cached)")
    allow_code_execution: bool = Field(
        False, description="tasks that run model-written code (humaneval, mbpp) need true"
    )
    require: Annotated[
        tuple[Requirement, ...],
        PlainValidator(
            _requirements,
            json_schema_input_type=dict[str, float | Annotated[str, Field(pattern=RELATIVE_SCORE.pattern)]],
        ),
    ] = Field(
        {},
        validate_default=True,
        description='the gate, per task: a score (0.40), or "base" / "best_source" with an optional '
        '"+ points" or "- points"',
    )
    sanity: bool = Field(True, description="the quick sanity check after every merge (false: off)")

    @model_validator(mode="after")
    def _tasks_given(self) -> EvalTable:
        if not self.tasks and self.model_fields_set - {"sanity"}:
            raise _problem('is required: a non-empty list of lm-eval task names, e.g. ["gsm8k"]', ("tasks",))
        return self


class _PerLayerGroup(_Table):
    """One value per group of decoder layers (mergekit-evolve's layer_granularity), optionally per filter."""

    layers_per_group: Annotated[int, Field(ge=1)] | None = Field(
        None, description="search one value per group of this many decoder layers (a per-tensor parameter)"
    )
    filters: Annotated[list[_NonEmpty], Field(min_length=1)] | None = Field(
        None, description='with layers_per_group: one value per group and filter, e.g. ["self_attn", "mlp"]'
    )


class SearchRange(_PerLayerGroup):
    """A range a searched value is drawn from (an Optuna float or int distribution)."""

    low: float = Field(description="the lowest value")
    high: float = Field(description="the highest value")
    step: Annotated[float, Field(gt=0)] | None = Field(
        None, description="draw only low, low + step, ... (the grid sampler needs it)"
    )
    log: bool = Field(False, description="draw on a log scale (low > 0, no step)")

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if not self.low < self.high:
            raise _problem(f"high ({self.high!r}) must be above low ({self.low!r})")
        if self.log and self.low <= 0:
            raise _problem(f"a log range needs low > 0, got {self.low!r}")
        if self.log and self.step is not None:
            raise _problem("a log range takes no step; drop one of them")
        return self


class SearchChoices(_PerLayerGroup):
    """The values a searched value is chosen from."""

    choices: Annotated[list[float | bool | str], Field(min_length=1)] = Field(
        description="the values to try, e.g. [0.5, 1.0]"
    )


class SearchResources(_Table):
    """What one trial needs on a Ray cluster (`--ray`)."""

    cpus: Annotated[float, Field(gt=0)] = Field(1.0, description="CPUs per trial")
    gpus: Annotated[float, Field(ge=0)] = Field(0.0, description="GPUs per trial (for evaluation)")
    memory: _Size | None = Field(
        None, description='memory per trial, e.g. "4GB"; default: the plan\'s estimate'
    )


SAMPLERS = ("tpe", "cmaes", "random", "grid")
PRUNERS = ("median", "hyperband", "none")


def _space_form(value: Any) -> str | None:
    return (
        "<choices>"
        if isinstance(value, dict) and "choices" in value
        else "<range>"
        if isinstance(value, dict)
        else None
    )


class SearchTable(_Table):
    """[search]: `hubmerge search` (pip install "hubmerge[search]"): which values to search, how, for what."""

    trials: int = Field(20, ge=1, description="how many trials the search runs (a rerun resumes up to it)")
    timeout: Annotated[float, Field(gt=0)] | None = Field(
        None, description="stop starting trials after this many seconds"
    )
    sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]
        "tpe", description="Optuna's sampler: tpe, cmaes, random or grid"
    )
    pruner: Literal[PRUNERS] = Field(  # type: ignore[valid-type]
        "median",
        description="Optuna's pruner, which stops a trial whose loss so far (per text domain) is worse than the "
        "others': median, hyperband or none",
    )
    seed: int | None = Field(None, description="the sampler's seed: the same seed draws the same trials")
    concurrency: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description='trials at a time; "auto": as many as this machine\'s memory, disk and cores hold (the '
        "plan's estimate per trial); default: one locally, the cluster's CPUs / cpus with --ray",
    )

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, value: Any) -> Any:
        if value is None or value == "auto" or (type(value) is int and value >= 1):
            return value
        raise _problem(f'must be a number of trials (1 or more) or "auto", got {value!r}')

    space: Annotated[
        dict[
            str,
            Annotated[
                Annotated[SearchRange, Tag("<range>")] | Annotated[SearchChoices, Tag("<choices>")],
                Discriminator(
                    _space_form,
                    custom_error_type="space",
                    custom_error_message="must be a range { low = ..., high = ... } or { choices = [...] }",
                ),
            ],
        ],
        Field(min_length=1),
    ] = Field(description='what to search, by recipe path: "parameters.scaling_factor", "models[1].weight"')
    objective: dict[str, float] = Field(
        {"loss": 1.0},
        description='what to optimise: [eval] task names and "loss" / "loss.DOMAIN" (mean loss per token on '
        "texts), each with its weight",
    )
    texts: str | None = Field(
        None,
        description="a text file (paragraphs between blank lines) for the loss; default: the sanity texts",
    )
    resources: SearchResources = Field(
        default_factory=dict, validate_default=True, description="per-trial resources on a Ray cluster"
    )


# Tags of the tagged unions below; they appear in pydantic's error locations and are dropped from key paths.
_SCALAR, _GRADIENT, _FILTERS = "<scalar>", "<gradient>", "<filters>"
_REFERENCE, _TABLE = "<reference>", "<table>"
_TAGS = frozenset((_SCALAR, _GRADIENT, _FILTERS, _REFERENCE, _TABLE, "<range>", "<choices>"))
_NOT_A_SETTING = "must be a value, a gradient [a, b, ...] or a list of {filter = ..., value = ...} tables"


def _setting_form(value: Any) -> str | None:
    """Which form of a per-tensor setting `value` is written in (`schedule.py`); None: none of them."""
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return _FILTERS
        return None if any(isinstance(v, (list, dict)) for v in value) else _GRADIENT
    return None if isinstance(value, dict) else _SCALAR


def _rule_value_form(value: Any) -> str | None:
    form = _setting_form(value)
    return form if form in (_SCALAR, _GRADIENT) else None


def _reference_form(value: Any) -> str | None:
    return _REFERENCE if isinstance(value, str) else _TABLE if isinstance(value, dict) else None


def _to_setting(value: Any) -> Setting:
    if isinstance(value, list):
        if value and isinstance(value[0], BaseModel):
            return tuple(Filter(rule.value, rule.filter) for rule in value)
        return Gradient(tuple(value))
    return value  # type: ignore[no-any-return]


def _one_value(value: Any) -> Any:
    if isinstance(value, list):
        raise _problem("is one value for the whole model: a gradient or a filter list is not allowed here")
    return value


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name))


def _scalar(p: Param) -> Any:
    if p.choices:
        return Literal[p.choices]
    if p.type in (int, float):
        return Annotated[p.type, Field(ge=p.minimum, le=p.maximum, allow_inf_nan=False)]
    return p.type


def _setting(p: Param, rule_name: str) -> Any:
    """A parameter's type: a scalar, or where `per_tensor` also a gradient or filter rules (`schedule.py`)."""
    scalar = _scalar(p)
    if not p.per_tensor:
        return Annotated[scalar, BeforeValidator(_one_value)]
    gradient = Annotated[list[scalar], Field(min_length=1)]  # type: ignore[valid-type]
    value = Annotated[
        Annotated[scalar, Tag(_SCALAR)] | Annotated[gradient, Tag(_GRADIENT)],  # type: ignore[valid-type]
        Discriminator(
            _rule_value_form,
            custom_error_type="rule_value",
            custom_error_message="must be a value or a gradient [a, b, ...]",
        ),
        AfterValidator(_to_setting),
    ]
    rule = create_model(
        rule_name,
        __base__=_Table,
        __doc__=f"A rule for {p.name}: its value for the tensors whose name contains `filter`; the first "
        "matching rule wins.",
        filter=(str, Field(None, description='a substring of the tensor name; absent or "*": every tensor')),
        value=(value, Field(description=p.help)),
    )
    rules = Annotated[list[rule], Field(min_length=1)]  # type: ignore[valid-type]
    return Annotated[
        Annotated[scalar, Tag(_SCALAR)]
        | Annotated[gradient, Tag(_GRADIENT)]
        | Annotated[rules, Tag(_FILTERS)],
        Discriminator(_setting_form, custom_error_type="setting", custom_error_message=_NOT_A_SETTING),
        AfterValidator(_to_setting),
    ]


def _reference(table: type[_Table]) -> Any:
    return Annotated[
        Annotated[str, Tag(_REFERENCE)] | Annotated[table, Tag(_TABLE)],
        Discriminator(
            _reference_form,
            custom_error_type="reference",
            custom_error_message="must be a model reference string or a table with 'source'",
        ),
    ]


def _params(
    params: tuple[Param, ...], types: Mapping[str, Any], prefix: str, note: str = ""
) -> dict[str, Any]:
    """pydantic fields for parameters, named `prefix` + position (a parameter's name may be a Python
    keyword or a BaseModel attribute) with the parameter's name as alias. Only a global parameter without
    a default (`prefix` "g") is required: a per-model one may come from `[parameters]` or a model table."""
    return {
        f"{prefix}{i}": (
            types[p.name],
            Field(
                ... if prefix == "g" and p.default is None else p.default,
                alias=p.name,
                description=p.help + note,
            ),
        )
        for i, p in enumerate(params)
    }


def _uncovered(settings: list[Setting]) -> str | None:
    """A tensor every checkpoint has that none of `settings` gives a value (their filter rules miss it)."""
    return next((n for n in ALWAYS_PRESENT if all(evaluate(s, n, 0.0) is None for s in settings)), None)


class _Recipe(_Table):
    """What every method's recipe model checks across its tables."""

    if TYPE_CHECKING:  # fields of every method's model (`_method_model`)
        method: str
        base: Any
        models: list[Any]
        parameters: BaseModel
        eval: EvalTable | None

    @model_validator(mode="after")
    def _models_have_their_parameters(self) -> _Recipe:
        """Every model has a value of each per-model parameter without a default, for every tensor (`plan`
        would refuse a filter list that misses one after reading the headers, plan._tensor_params), and the
        method accepts the models' values together (`Method.check_models`)."""
        method = METHODS[self.method]
        parameters = given(self.parameters)
        own = {p.name: parameters[p.name] for p in method.params if p.name in parameters}
        defaults = {p.name: parameters[p.name] for p in method.model_params if p.name in parameters}
        models = [model_settings(m) for m in self.models]
        for i, settings in enumerate(models):
            for p in method.model_params:
                if p.default is None and p.name not in settings and p.name not in defaults:
                    raise _problem(f"is required by {method.name}: {p.help}", ("models", i, p.name))
        for p in method.params:
            tensor = _uncovered([own[p.name]]) if p.default is None and p.name in own else None
            if tensor is not None:
                raise _problem(
                    f"no value for tensor {tensor} (no filter matches it); add a rule without a filter",
                    ("parameters", p.name),
                )
        for i, settings in enumerate(models):
            for p in method.model_params:
                chain = [s for s in (settings.get(p.name), defaults.get(p.name)) if s is not None]
                tensor = _uncovered(chain) if p.default is None and chain else None
                if tensor is not None:
                    raise _problem(
                        f"no value for tensor {tensor} (no filter matches it); add a rule without a filter, or a "
                        "default in [parameters]",
                        ("models", i, p.name),
                    )
        if method.check_models is not None:
            problem = method.check_models(own, [{**defaults, **m} for m in models])
            if problem is not None:
                raise _problem(problem, ("models",))
        return self

    @model_validator(mode="after")
    def _base_for_require(self) -> _Recipe:
        for requirement in self.eval.require if self.eval is not None else ():
            if requirement.reference == "base" and self.base is None:
                raise _problem(
                    'compares with the base, but the recipe has none; use "best_source" or a number',
                    ("eval", "require", requirement.task),
                )
        return self


@functools.cache
def _setting_types(m: Method) -> dict[str, Any]:
    """The type of each of a method's parameters, as its [parameters] and [[models]] keys read it."""
    name = _camel(m.name)
    return {p.name: _setting(p, f"{name}{_camel(p.name)}Rule") for p in m.params + m.model_params}


@functools.cache
def _method_model(m: Method) -> type[_Table]:
    """The recipe of one method: its `method` tag, its [parameters] and its [[models]] keys."""
    name = _camel(m.name)
    types = _setting_types(m)
    parameters = create_model(
        f"{name}Parameters",
        __base__=_Table,
        __doc__=f"The parameters of {m.name}; a per-model one here is the default for every model.",
        **_params(m.params, types, "g"),
        **_params(m.model_params, types, "m", " (the default for every model)"),
    )
    model = create_model(
        f"{name}Model",
        __base__=SourceTable,
        __doc__=f"A model of a {m.name} merge, with its own parameters.",
        **_params(m.model_params, types, "m"),
    )
    count = m.contract.describe().split("; ")[1]
    models: Any = list[_reference(model)]  # type: ignore[misc]
    fields: dict[str, Any] = {
        "method": (Literal[m.name], Field(description=m.title)),
        "base": (
            _reference(SourceTable),
            Field(
                ... if m.needs_base else None,
                description=f"the base model ({m.contract.base}): a Hub id, id@revision, or a local folder",
            ),
        ),
        "models": (
            Annotated[models, Field(min_length=m.contract.min_models, max_length=m.contract.max_models)],
            Field(description=f"the models to merge ({count}): references or [[models]] tables"),
        ),
        "dtype": (
            Literal[DTYPES],
            Field(None, description="output dtype; default: the base's (else the first model's) dtype"),
        ),
        "parameters": (
            parameters,
            Field(default_factory=dict, validate_default=True, description=f"the parameters of {m.name}"),
        ),
        "tokenizer": (
            TokenizerTable,
            Field(None, description="where the tokenizer files and chat template come from"),
        ),
        "output": (OutputTable, Field(default_factory=dict, validate_default=True, description="the output")),
        "card": (
            CardTable,
            Field(default_factory=dict, validate_default=True, description="model card options"),
        ),
        "eval": (EvalTable, Field(None, description="evaluation with lm-evaluation-harness")),
        "search": (SearchTable, Field(None, description="`hubmerge search`: search the recipe's values")),
        "allow_non_finite": (
            bool,
            Field(False, description="merge sources holding NaN or Inf (refused by default)"),
        ),
    }
    return create_model(f"{name}Recipe", __base__=_Recipe, __doc__=f"{m.title}: {m.formula}", **fields)


@functools.cache
def _schema() -> TypeAdapter[Any]:
    members = tuple(_method_model(m) for m in METHODS.values())
    recipe: Any = functools.reduce(operator.or_, members)
    return TypeAdapter(Annotated[recipe, Field(discriminator="method")])


class _NoFieldTitles(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # a property's name is its title; the descriptions say the rest


def _without_null(node: Any) -> Any:
    """TOML has no null: an optional key is one that may be absent, not one that may be null."""
    if isinstance(node, list):
        return [_without_null(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _without_null(v) for k, v in node.items() if not (k == "default" and v is None)}
    if {"type": "null"} in node.get("anyOf", ()):
        rest = [branch for branch in node.pop("anyOf") if branch != {"type": "null"}]
        node = {**rest[0], **node} if len(rest) == 1 else {**node, "anyOf": rest}
    return node


def json_schema() -> dict[str, Any]:
    """The recipe as JSON Schema (draft 2020-12), for editors: `hubmerge schema`."""
    schema = _schema().json_schema(schema_generator=_NoFieldTitles)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hubmerge recipe",
        "description": "A hubmerge merge recipe (TOML); generated by `hubmerge schema` from the method "
        "registry.",
        **_without_null(schema),
    }


# --- errors -------------------------------------------------------------------------------------------------

_KINDS = {
    "string_type": "a string",
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a number",
    "list_type": "a list",
    "dict_type": "a table",
    "tuple_type": "a list",  # a TOML list read into a tuple
    "model_type": "a table",
}
_BOUNDS = {"greater_than_equal": "ge", "less_than_equal": "le", "greater_than": "gt", "less_than": "lt"}
_SIGNS = {"ge": ">=", "le": "<=", "gt": ">", "lt": "<"}


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return "unknown key" + (f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}")


def _mergekit_habit(method: Method, key: str) -> str | None:
    """A hint for a key that is right in mergekit, under another name (or method) in hubmerge."""
    names = {p.name for p in method.params + method.model_params}
    if key == "lambda" and "scaling_factor" in names:
        return "unknown key; did you mean 'scaling_factor'? (mergekit calls it lambda)"
    hint = method.key_hints.get(key)
    return f"unknown key; {hint}" if hint is not None else None


def _method_problem(data: Mapping[str, Any]) -> tuple[str, str]:
    """(key, message) for a recipe whose `method` names no method."""
    known = _schema_keys()
    for key in data:
        if key not in known:
            return key, _unknown_key(key, known)
    name = data.get("method")
    if name is None:
        return "method", f"is required; one of {', '.join(METHODS)}"
    if not isinstance(name, str):
        return "method", f"must be a string, got {name!r}"
    close = difflib.get_close_matches(name.lower().replace("-", "_"), METHODS, n=1)  # mergekit's "TIES" too
    hint = f"did you mean {close[0]!r}?" if close else f"known methods: {', '.join(METHODS)}"
    return "method", f"unknown method {name!r}; {hint}"


def _schema_keys() -> list[str]:
    return list(_method_model(next(iter(METHODS.values()))).model_fields)


def _message(error: ErrorDetails, path: list[str | int], form: str | None, method: Method) -> str:
    kind, value, ctx = error["type"], error["input"], error.get("ctx") or {}
    got = f", got {value!r}"
    if kind == "recipe":
        return error["msg"]
    if kind == "unknown_key":
        if path == ["parameters"] and not ctx["known"]:
            return f"{method.name} takes no parameters"
        return _mergekit_habit(method, ctx["key"]) or _unknown_key(ctx["key"], ctx["known"])
    if kind in ("setting", "rule_value", "reference", "space"):
        return error["msg"] + got
    if kind == "missing":
        if path == ["base"]:
            return f"is required by method {method.name!r}: the model the task vectors are taken from"
        if path == ["models"]:
            return "is required: a list of model references to merge"
        if len(path) == 2 and path[0] == "parameters":
            return f"is required by {method.name}: {method.param(str(path[1])).help}"
        return "is required"
    if path == ["models"] and kind in ("too_short", "too_long", "list_type"):
        if kind != "list_type" and value:
            count = method.contract.describe().split("; ")[1]
            return f"{method.name} takes {count}, got {len(value)}"
        return "must be a non-empty list of model references or [[models]] tables"
    if kind == "too_short" and form == _GRADIENT:
        return "is an empty list; give a value, a gradient [a, b, ...] or filter rules"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "literal_error":
        if path == ["dtype"]:
            close = difflib.get_close_matches(str(value), DTYPES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(DTYPES)}"
            return f"unknown dtype {value!r}; {hint}"
        return f"must be one of {ctx['expected'].replace(' or ', ', ')}{got}"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}{got}"
    if kind in _BOUNDS:
        bound = _BOUNDS[kind]
        return f"must be {_SIGNS[bound]} {ctx[bound]!r}{got}"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    return error["msg"][:1].lower() + error["msg"][1:] + got


def _key_path(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, str) and not re.fullmatch(r"[A-Za-z0-9_-]+", part):
            part = f'"{part}"'  # a quoted TOML key: search.space."models[1].weight"
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


class Problem(Exception):
    """A recipe mistake: the key path (`models[1].weight`, "" for the whole file) and what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def validate(data: Mapping[str, Any], recipe: Path, output_dir: Path | None = None) -> Any:
    """The parsed TOML `data` of the file `recipe` as the validated tables of its method's recipe model
    (attributes named as the TOML keys, parameters read with `given`, paths resolved from `recipe`'s folder;
    `output_dir`, absolute, replaces `output.dir`); raises `Problem` for the first mistake."""
    try:
        return _schema().validate_python(data, context={"recipe": recipe, "output_dir": output_dir})
    except ValidationError as exc:
        raise Problem(*_first_problem(data, exc)) from None


def _first_problem(data: Mapping[str, Any], exc: ValidationError) -> tuple[str, str]:
    """The first of pydantic's errors as (key path, message)."""
    error = exc.errors(include_url=False)[0]
    if error["type"] in ("union_tag_not_found", "union_tag_invalid") and not error["loc"]:
        return _method_problem(data)
    return _located(error, error["loc"][1:], METHODS[data["method"]])  # loc[0] is the method's tag


def _located(error: ErrorDetails, loc: tuple[str | int, ...], method: Method) -> tuple[str, str]:
    """(key path, message) of a pydantic error at `loc`, the union tags taken out of it."""
    path: list[str | int] = []
    form = None
    for part in loc:
        if part in _TAGS:
            form = part
        else:
            path.append(part)
    if error["type"] == "recipe":
        path += error["ctx"]["at"]
    if error["type"] == "unknown_key":
        return _key_path([*path, error["ctx"]["key"]]), _message(error, path, form, method)
    return _key_path(path), _message(error, path, form, method)


@functools.cache
def _setting_adapter(method: Method, name: str) -> TypeAdapter[Any]:
    # Strict as the recipe's tables are: no "1" for 1, no true for 1.
    return TypeAdapter(_setting_types(method)[name], config=ConfigDict(strict=True))


def parse_setting(method: Method, name: str, value: Any) -> Setting:
    """`value` (as TOML or JSON reads it) as the setting of `method`'s parameter `name`, read and checked as
    the recipe reads it: a scalar, or where the parameter is per-tensor a `Gradient` or `Filter` rules.

    Raises `Problem` for the first mistake, its key the path below the setting (`[0].value`, "" for the
    setting itself) and its message the one the recipe gives."""
    try:
        return _setting_adapter(method, name).validate_python(value)  # type: ignore[no-any-return]
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise Problem(*_located(error, error["loc"], method)) from None
