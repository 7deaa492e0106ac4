"""The recipe: a TOML file parsed and validated into a frozen `Recipe`, before anything touches a model.

The schema (`schema.py`) checks every key and value and resolves the paths of [output], [card] and [eval]
relative to the file; its validated tables are the recipe's `output`, `card` and `eval`. This module reads
the file, reads model references (`reference.py`) and checks what joins the models to the method's
parameters. Every error names the key path
(`models[1].weight: ...`) and, for TOML syntax, line and column, and suggests the closest known key for a
typo. The schema is a contract: extend it, never rename keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError, SourceError
from ..merging.methods import METHODS, Method
from ..merging.schedule import Setting
from ..search.space import SearchSpec, search_spec
from . import schema
from .reference import BadReference, ModelRef, parse_reference
from .schema import CardTable, EvalTable, OutputTable, parse_size, resolve_path

if TYPE_CHECKING:
    from ..search.publish import SearchCard

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "Recipe",
    "load_recipe",
    "loads_recipe",
    "missing_folder",
    "parse_size",
]


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
    output: OutputTable
    card: CardTable
    allow_non_finite: bool  # merge sources holding NaN or Inf (refused by default)
    warnings: tuple[str, ...]  # valid, but probably not what the author meant
    eval: EvalTable | None  # the [eval] table; None when it has no tasks (or the recipe has none)
    sanity: bool  # the quick sanity check after every merge (sanity.py); `[eval] sanity = false` skips it
    search: SearchSpec | None  # the [search] table (`hubmerge search`)
    # The search that found the values (`hubmerge search --publish best` sets it); None for a recipe as loaded.
    search_card: SearchCard | None = None

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
    """Model references (local folders or Hub ids, `reference.py`) and the warnings about a valid recipe;
    every mistake is `file: key.path: message`."""

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
        return self.reference(value.source, value.revision, key, schema.model_settings(value))

    def reference(self, text: str, revision: str | None, key: str, params: Mapping[str, Setting]) -> ModelRef:
        try:
            ref = parse_reference(text, (self.root,), revision)
        except BadReference as exc:
            raise self.fail(key, str(exc)) from None
        ref = dataclasses.replace(ref, params=params)
        if ref.repo_id is None or "/" not in ref.repo_id:
            return ref
        near = (self.root / ref.repo_id).resolve()
        if not near.parent.is_dir():
            return ref
        self.warnings.append(
            f"{self.path}: {key}: {ref.text!r} is read as a Hub id although {near.parent.name}/ is a folder next "
            "to the recipe; prefix local folders with ./"
        )
        return dataclasses.replace(ref, near=near)


_NOT_YAML = (
    "this looks like a YAML file (a mergekit config?); hubmerge recipes are TOML: convert a mergekit config "
    "with `hubmerge import-mergekit CONFIG.yml -o recipe.toml`, or see docs/recipe.md"
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
        override = resolve_path(str(output_dir), Path.cwd()) if output_dir is not None else None
    except ValueError as exc:
        raise reader.fail("--output", str(exc)) from None
    try:
        tables = schema.validate(data, path, override)
    except schema.Problem as problem:
        raise reader.fail(problem.key, problem.message) from None
    return _build(reader, tables, text)


def missing_folder(recipe: Recipe, name: str | Path | None = None) -> None:
    """Raise `SourceError` for the first local model folder of `recipe` that does not exist; the message
    names the recipe as `name` (default: its absolute path)."""
    for ref in (recipe.base, *recipe.models, recipe.tokenizer):
        if ref is not None and ref.path is not None and not ref.path.is_dir():
            raise SourceError(f"{name or recipe.path}: {ref.text!r} is not a folder ({ref.path})")


def _build(r: _Reader, tables: Any, text: str) -> Recipe:
    method: Method = METHODS[tables.method]
    parameters = schema.given(tables.parameters)
    given = {p.name: parameters[p.name] for p in method.params if p.name in parameters}
    model_defaults = {p.name: parameters[p.name] for p in method.model_params if p.name in parameters}
    models = tuple(r.model(m, f"models[{i}]") for i, m in enumerate(tables.models))
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

    spec: EvalTable | None = tables.eval if tables.eval is not None and tables.eval.tasks else None
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
        output=tables.output,
        card=tables.card,
        allow_non_finite=tables.allow_non_finite,
        warnings=tuple(warnings),
        eval=spec,
        sanity=(tables.eval.sanity if tables.eval else EvalTable.model_fields["sanity"].default),
        search=_search(r, tables, method, len(models), spec),
    )


def _search(
    r: _Reader, tables: Any, method: Method, models: int, spec: EvalTable | None
) -> SearchSpec | None:
    if tables.search is None:
        return None
    from ..quality.sanity import sanity_texts

    try:
        written = {f"parameters.{k}": v for k, v in schema.given(tables.parameters).items()}
        for i, m in enumerate(tables.models):
            written |= {f"models[{i}].{k}": v for k, v in schema.model_settings(m).items()}
        tasks = spec.tasks if spec else ()
        return search_spec(tables.search, method, written, models, tasks, r.root, tuple(sanity_texts()))
    except schema.Problem as problem:
        raise r.fail(problem.key, problem.message) from None
