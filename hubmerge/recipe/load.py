"""The recipe: a TOML file parsed and validated into a frozen `Recipe`, before anything touches a model.

The schema (`schema.py`) checks every key and value; this module reads the file, resolves model references
and paths relative to it, and checks what joins several keys. Every error names the key path
(`models[1].weight: ...`) and, for TOML syntax, line and column, and suggests the closest known key for a
typo. The schema is a contract: extend it, never rename keys.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError, SourceError
from ..merging.methods import METHODS, Method
from ..merging.schedule import Setting, evaluate
from ..search.space import SearchSpec, search_spec
from ..sources.qwen import ALWAYS_PRESENT
from . import schema
from .schema import RELATIVE_SCORE, REPO_ID, parse_size

if TYPE_CHECKING:
    from ..search.publish import SearchCard

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "CardSpec",
    "EvalSpec",
    "ModelRef",
    "OutputSpec",
    "Recipe",
    "Requirement",
    "load_recipe",
    "loads_recipe",
    "missing_folder",
    "parse_size",
]


@dataclass(frozen=True)
class ModelRef:
    """A source model as the recipe names it: a local folder, or a Hub repo at a revision."""

    text: str  # as written, for messages and the card
    path: Path | None = None  # absolute, for local folders
    repo_id: str | None = None
    revision: str | None = None  # as written; resolved to a commit sha by the source stage
    params: Mapping[str, Setting] = field(default_factory=dict)  # this mention's own per-model settings
    # For a Hub id that is also a path under an existing folder next to the recipe (`tiny/mathh`): the
    # folder it would be, so that a failed Hub lookup can say "no such folder" instead of "cannot reach".
    near: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def display(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return str(self.path)


@dataclass(frozen=True)
class OutputSpec:
    dir: Path
    repo: str | None = None
    private: bool | None = None
    branch: str | None = None
    create_pr: bool = False
    max_shard_size: int = 5 * 10**9
    max_disk: int | None = None  # bytes of disk the run may use; None: the free space (budget.py)
    stats: bool = True  # merge diagnostics (diagnostics.py): merge_stats.json and plots in the output
    # Prove every streamed byte against the Hub's sha256 (remote.py); False: sizes and headers only.
    verify_streamed: bool = True
    gguf: tuple[str, ...] = ()  # GGUF file types (gguf/writer.py GGUF_TYPES), written after the weights
    gguf_repo: str | None = None  # the repo they are pushed to, when `repo` is set and `gguf` is not empty

    @property
    def gguf_dir(self) -> Path:
        """Where the GGUF files are written: the output folder when they go beside the weights, else a
        companion folder `{dir}-GGUF` with its own card."""
        return self.dir if self.gguf_repo == self.repo else self.dir.with_name(self.dir.name + "-GGUF")


@dataclass(frozen=True)
class CardSpec:
    template: Path | None = None
    title: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    search: SearchCard | None = None  # the search that found the values (`hubmerge search --publish best`)


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


@dataclass(frozen=True)
class EvalSpec:
    """The `[eval] table`: which lm-evaluation-harness tasks to run, how, and what the merge must reach."""

    tasks: tuple[str, ...]
    limit: int | float | None = None  # lm-eval's: examples per task, or a fraction of them when below 1
    num_fewshot: int | None = None
    batch_size: int = 1
    include_path: Path | None = None  # a folder of custom task YAMLs, absolute
    device: str = "cpu"
    dtype: str = "auto"  # "auto": the checkpoint's own dtype
    sources: bool = True  # also evaluate the base and every model (`hubmerge RECIPE --eval`)
    allow_code_execution: bool = False
    require: tuple[Requirement, ...] = ()


@dataclass(frozen=True)
class Recipe:
    path: Path
    text: str
    method: Method
    parameters: Mapping[str, Setting]  # method parameters, defaults filled in
    models: tuple[ModelRef, ...]
    base: ModelRef | None
    tokenizer: ModelRef | None  # None: the base's (or the first model's) tokenizer
    dtype: str | None
    output: OutputSpec
    card: CardSpec
    allow_non_finite: bool = False  # merge sources holding NaN or Inf (refused by default)
    warnings: tuple[str, ...] = ()  # valid, but probably not what the author meant
    eval: EvalSpec | None = None  # the [eval] table; None when the recipe has none
    sanity: bool = (
        True  # the quick sanity check after every merge (sanity.py); `[eval] sanity = false` skips it
    )
    search: SearchSpec | None = None  # the [search] table (`hubmerge search`)

    @property
    def published_text(self) -> str:
        """The recipe as the output keeps it (hubmerge.toml): `text` without a first-line `#:schema` directive
        naming a local file, which would point nowhere beside the output or in its Hub repo."""
        first, _, rest = self.text.partition("\n")
        directive = re.fullmatch(r"#:schema\s+(\S+)\s*", first)
        keep = directive is None or re.match(r"https?://", directive.group(1)) is not None
        return self.text if keep else rest

    @property
    def sha256(self) -> str:
        """sha256 of `published_text`: the same for the recipe and its copy beside the output, so that the
        card, the lock and the copy agree, and `--lock` accepts either."""
        return hashlib.sha256(self.published_text.encode()).hexdigest()

    @property
    def tokenizer_source(self) -> ModelRef:
        return self.tokenizer or self.base or self.models[0]


# --- from the validated tables to the frozen Recipe ---------------------------------------------------------


class _Reader:
    """What the schema cannot know: paths relative to the recipe, local folders or Hub ids, and the checks
    that join several keys; every mistake is `file: key.path: message`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path.parent
        self.warnings: list[str] = []  # valid, but probably not what the author meant

    def fail(self, key: str, message: str) -> RecipeError:
        key = key if key.isprintable() else repr(key)  # a quoted TOML key may hold a newline: keep one line
        return RecipeError(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def model(self, value: Any, key: str) -> ModelRef:
        """A `models` entry, `base` or `[tokenizer]`: a reference string or a table."""
        if isinstance(value, str):
            return self.reference(value, None, key, {})
        params = {k: v for k, v in schema.given(value).items() if k not in ("source", "revision")}
        return self.reference(value.source, value.revision, key, params)

    def reference(self, text: str, revision: str | None, key: str, params: Mapping[str, Setting]) -> ModelRef:
        text = text.strip()
        if not text:
            raise self.fail(key, 'is empty; give a Hub id such as "Qwen/Qwen2.5-1.5B" or a folder path')
        local = text.startswith((".", "/", "~")) or self.path_of(text, key).is_dir()
        if local:
            if revision is not None:
                raise self.fail(key, f"{text!r} is a local folder; a revision applies to Hub models only")
            return ModelRef(text, path=self.path_of(text, key), params=params)
        repo_id, _, at_revision = text.partition("@")
        if at_revision and revision is not None:
            raise self.fail(
                key, f"{text!r} already pins a revision; drop either '@{at_revision}' or 'revision'"
            )
        if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
            raise self.fail(
                key,
                f"{text!r} is neither an existing folder (relative to {self.root}) nor a Hub id like "
                '"org/name[@revision]"',
            )
        near = (self.root / repo_id).resolve()
        if "/" not in repo_id or not near.parent.is_dir():
            return ModelRef(text, repo_id=repo_id, revision=at_revision or revision, params=params)
        self.warnings.append(
            f"{self.path}: {key}: {text!r} is read as a Hub id although {near.parent.name}/ is a folder next to "
            "the recipe; prefix local folders with ./"
        )
        return ModelRef(text, repo_id=repo_id, revision=at_revision or revision, params=params, near=near)

    def path_of(self, text: str, key: str, root: Path | None = None) -> Path:
        """`text` as an absolute path, relative to `root` (the recipe's folder by default)."""
        try:
            path = ((root or self.root) / Path(text).expanduser()).resolve()
            path.exists()  # raises for a name the system refuses (too long), which later checks would not expect
            return path
        except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, an unknown ~user, a name too long
            raise self.fail(key, f"{text!r} is not a usable path ({exc})") from None


_NOT_YAML = (
    "this looks like a YAML file (a mergekit config?); hubmerge recipes are TOML: convert a mergekit config "
    'with `hubmerge import-mergekit CONFIG.yml -o recipe.toml`, or see docs/recipe.md'
)
# A YAML mapping line (`key: value`, `- item`) is never valid TOML at the start of a line.
_YAML_LINE = re.compile(r"^(?:[A-Za-z_][\w.-]*:(?:\s|$)|-\s)")


def _syntax_hint(message: str, text: str) -> str:
    """What a TOML error means for a recipe author, for the mistakes TOML's own message does not explain."""
    if "Cannot mutate immutable namespace ('models',)" in message:
        return (
            "; `models = [...]` and [[models]] tables cannot be mixed: list every model one way (use [[models]] "
            "tables when one needs a weight or revision)"
        )
    if any(_YAML_LINE.match(line) for line in text.splitlines() if line.strip() and not line.startswith("#")):
        return f"; {_NOT_YAML}"
    return ""


def load_recipe(path: str | Path, output_dir: str | Path | None = None) -> Recipe:
    """Read and validate a recipe file. Raises `RecipeError` with one actionable line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    if path.suffix.lower() in (".yml", ".yaml"):
        raise RecipeError(f"{path}: {_NOT_YAML}")
    return loads_recipe(text, path, output_dir)


def loads_recipe(text: str, path: str | Path, output_dir: str | Path | None = None) -> Recipe:
    """Validate recipe `text` as if it were the file `path` (which need not exist): relative folders are read
    from `path`'s folder and errors name `path`. Raises `RecipeError` with one actionable line."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)|\(at end of document\)", message)
        if where is None:
            raise RecipeError(f"{path}: TOML syntax error: {message}") from None
        lines = text.splitlines() or [""]
        line, column = (
            (where.group(1), where.group(2)) if where.group(1) else (len(lines), len(lines[-1]) + 1)
        )
        raise RecipeError(
            f"{path}:{line}:{column}: TOML syntax error: {message[: where.start()].strip()}{_syntax_hint(message, text)}"
        ) from None
    reader = _Reader(path)
    try:
        tables = schema.validate(data)
    except schema.Problem as problem:
        raise reader.fail(problem.key, problem.message) from None
    return _build(reader, tables, text, output_dir)


def missing_folder(recipe: Recipe, name: str | Path | None = None) -> None:
    """Raise `SourceError` for the first local model folder of `recipe` that does not exist; the message
    names the recipe as `name` (default: its absolute path)."""
    for ref in (recipe.base, *recipe.models, recipe.tokenizer):
        if ref is not None and ref.path is not None and not ref.path.is_dir():
            raise SourceError(f"{name or recipe.path}: {ref.text!r} is not a folder ({ref.path})")


def _check_coverage(
    r: _Reader,
    method: Method,
    given: Mapping[str, Setting],
    model_defaults: Mapping[str, Setting],
    models: tuple[ModelRef, ...],
) -> None:
    """Refuse a parameter without a default whose filter rules give no value to a tensor every checkpoint
    has: `plan` would refuse it after reading the headers (plan._tensor_params), `validate` says it first."""

    def uncovered(settings: list[Setting]) -> str | None:
        return next((n for n in ALWAYS_PRESENT if all(evaluate(s, n, 0.0) is None for s in settings)), None)

    for p in method.params:
        name = uncovered([given[p.name]]) if p.default is None and p.name in given else None
        if name is not None:
            raise r.fail(
                f"parameters.{p.name}",
                f"no value for tensor {name} (no filter matches it); add a rule without a filter",
            )
    for i, model in enumerate(models):
        for p in method.model_params:
            settings = [s for s in (model.params.get(p.name), model_defaults.get(p.name)) if s is not None]
            name = uncovered(settings) if p.default is None and settings else None
            if name is not None:
                raise r.fail(
                    f"models[{i}].{p.name}",
                    f"no value for tensor {name} (no filter matches it); add a rule without a filter, or a default "
                    "in [parameters]",
                )


def _build(r: _Reader, tables: Any, text: str, output_dir: str | Path | None) -> Recipe:
    method: Method = METHODS[tables.method]
    parameters = schema.given(tables.parameters)
    given = {p.name: parameters[p.name] for p in method.params if p.name in parameters}
    model_defaults = {p.name: parameters[p.name] for p in method.model_params if p.name in parameters}
    models = tuple(r.model(m, f"models[{i}]") for i, m in enumerate(tables.models))
    for i, m in enumerate(models):
        for p in method.model_params:
            if p.default is None and p.name not in m.params and p.name not in model_defaults:
                raise r.fail(f"models[{i}].{p.name}", f"is required by {method.name}: {p.help}")
    _check_coverage(r, method, given, model_defaults, models)
    if method.check_models is not None:
        problem = method.check_models(given, [{**model_defaults, **m.params} for m in models])
        if problem is not None:
            raise r.fail("models", problem)
    warnings = r.warnings
    if not method.needs_base and len(models) == 1 and method.contract.max_models != 1:
        # Allowed (a re-save of one model in another dtype or with another card), but rarely what is meant;
        # a method made for one model (`max_models == 1`) is not warned about.
        warnings.append(f"{r.path}: models: {method.name} of one model writes a copy of it")
    if method.advise is not None:
        warnings += [f"{r.path}: {advice}" for advice in method.advise(given)]
    # density is the fraction of a task vector kept: 0 keeps none of it, and with every model at 0 the merge
    # is the base unchanged. Valid, but more likely a misreading than the intent.
    dropped = [
        f"models[{i}]"
        for i, m in enumerate(models)
        if any(p.name == "density" for p in method.model_params)
        and m.params.get("density", model_defaults.get("density")) == 0
    ]
    if dropped:
        where = (
            "density = 0" if len(dropped) == len(models) else ", ".join(f"{k}.density = 0" for k in dropped)
        )
        effect = (
            "the merge is the base model, unchanged"
            if len(dropped) == len(models)
            else f"{' and '.join(dropped)} add{'s' if len(dropped) == 1 else ''} nothing to the merge"
        )
        warnings.append(
            f"{r.path}: {where} keeps none of the task vector ({effect}); density is the fraction kept, "
            "1 keeps all of it"
        )
    base = r.model(tables.base, "base") if tables.base is not None else None
    tokenizer = tables.tokenizer
    if tokenizer is not None and tokenizer.source not in (None, "base"):
        tokenizer = r.reference(tokenizer.source, tokenizer.revision, "tokenizer", {})
    else:
        tokenizer = None

    out = tables.output
    if output_dir is not None:
        out_dir = r.path_of(str(output_dir), "--output", Path.cwd())
    elif out.dir is not None:
        out_dir = r.path_of(out.dir, "output.dir")
    else:
        out_dir = (Path.cwd() / "outputs" / r.path.stem).resolve()
    if out.create_pr and out.branch not in (None, "main"):
        raise r.fail("output.create_pr", "a pull request targets main; drop 'branch' or 'create_pr'")
    output = OutputSpec(
        dir=out_dir,
        repo=out.repo,
        private=out.private,
        branch=out.branch,
        create_pr=out.create_pr,
        max_shard_size=out.max_shard_size,
        stats=out.stats,
        verify_streamed=out.verify_streamed,
        max_disk=out.max_disk,
        gguf=tuple(dict.fromkeys(out.gguf)),
        gguf_repo=(out.repo if out.gguf_repo == "same" else out.gguf_repo or f"{out.repo}-GGUF")
        if out.repo and out.gguf
        else None,
    )

    c = tables.card
    card = CardSpec(
        template=r.path_of(c.template, "card.template") if c.template else None,
        title=c.title,
        description=c.description,
        tags=tuple(c.tags),
        language=tuple(c.language),
        license=c.license,
        license_name=c.license_name,
        license_link=c.license_link,
    )
    if card.template is not None and not card.template.is_file():
        raise r.fail("card.template", f"no such template file {card.template}")

    fields = _eval_fields(r, tables.eval, base is not None)
    return Recipe(
        path=r.path.resolve(),
        text=text,
        method=method,
        # Global parameters with their defaults, and the per-model ones `[parameters]` sets for every model.
        parameters={
            **{p.name: p.default for p in method.params if p.default is not None},
            **given,
            **model_defaults,
        },
        models=models,
        base=base,
        tokenizer=tokenizer,
        dtype=tables.dtype,
        output=output,
        card=card,
        allow_non_finite=tables.allow_non_finite,
        warnings=tuple(warnings),
        search=_search(r, tables, method, len(models), fields.get("eval")),
        **fields,
    )


def _search(r: _Reader, tables: Any, method: Method, models: int, spec: EvalSpec | None) -> SearchSpec | None:
    if tables.search is None:
        return None
    from ..quality.sanity import sanity_texts

    try:
        written = {f"parameters.{k}": v for k, v in schema.given(tables.parameters).items()}
        for i, m in enumerate(tables.models):
            if not isinstance(m, str):
                given = schema.given(m)
                written |= {
                    f"models[{i}].{k}": v for k, v in given.items() if k not in ("source", "revision")
                }
        tasks = spec.tasks if spec else ()
        return search_spec(tables.search, method, written, models, tasks, r.root, tuple(sanity_texts()))
    except schema.Problem as problem:
        raise r.fail(problem.key, problem.message) from None


def _eval_fields(r: _Reader, table: Any, has_base: bool) -> dict[str, Any]:
    """`Recipe.eval` and `Recipe.sanity` from the `[eval]` table."""
    if table is None:
        return {}
    if table.model_fields_set <= {"sanity"}:
        return {"sanity": table.sanity}
    if table.tasks is None:
        raise r.fail("eval.tasks", 'is required: a non-empty list of lm-eval task names, e.g. ["gsm8k"]')
    include_path = (r.root / Path(table.include_path).expanduser()).resolve() if table.include_path else None
    if include_path is not None and not include_path.is_dir():
        raise r.fail("eval.include_path", f"no such folder {include_path} (relative to the recipe)")
    require = []
    for task, value in table.require.items():
        key = f"eval.require.{task}"
        if task not in table.tasks:
            raise r.fail(key, f"is not one of eval.tasks ({', '.join(table.tasks)})")
        if isinstance(value, float):
            require.append(Requirement(task, str(value), threshold=value))
            continue
        reference, sign, amount = RELATIVE_SCORE.match(value).groups()  # type: ignore[union-attr]
        if reference == "base" and not has_base:
            raise r.fail(
                key, 'compares with the base, but the recipe has none; use "best_source" or a number'
            )
        offset = float(amount or 0) * (-1 if sign == "-" else 1)
        require.append(Requirement(task, value, reference=reference, offset=offset))
    spec = EvalSpec(
        tasks=tuple(dict.fromkeys(t.strip() for t in table.tasks)),
        limit=table.limit,
        num_fewshot=table.num_fewshot,
        batch_size=table.batch_size,
        include_path=include_path,
        device=table.device,
        dtype=table.dtype,
        sources=table.sources,
        allow_code_execution=table.allow_code_execution,
        require=tuple(require),
    )
    return {"eval": spec, "sanity": table.sanity}
