"""The recipe: a TOML file parsed and validated into a frozen `Recipe`, before anything touches a model.

Every error names the key path (`models[1].weight: ...`) and, for TOML syntax, line and column, and
suggests the closest known key for a typo. The schema is a contract: extend it, never rename keys.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .methods import METHODS, Method, Param, ParamValue

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["CardSpec", "ModelRef", "OutputSpec", "Recipe", "load_recipe", "parse_size"]

DTYPES = ("bfloat16", "float16", "float32")
# Hub repo ids: `name` or `namespace/name`, as huggingface_hub validates them.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9_.\-]{1,96}/)?[A-Za-z0-9_.\-]{1,96}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
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


@dataclass(frozen=True)
class ModelRef:
    """A source model as the recipe names it: a local folder, or a Hub repo at a revision."""

    text: str  # as written, for messages and the card
    path: Path | None = None  # absolute, for local folders
    repo_id: str | None = None
    revision: str | None = None  # as written; resolved to a commit sha by the source stage
    params: Mapping[str, ParamValue] = field(default_factory=dict)

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


@dataclass(frozen=True)
class Recipe:
    path: Path
    text: str
    method: Method
    parameters: Mapping[str, ParamValue]  # method parameters, defaults filled in
    models: tuple[ModelRef, ...]
    base: ModelRef | None
    tokenizer: ModelRef | None  # None: the base's (or the first model's) tokenizer
    dtype: str | None
    output: OutputSpec
    card: CardSpec

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def tokenizer_source(self) -> ModelRef:
        return self.tokenizer or self.base or self.models[0]


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


class _Reader:
    """Walks the parsed TOML, turning every mistake into `file: key.path: message`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path.parent

    def fail(self, key: str, message: str) -> RecipeError:
        key = key if key.isprintable() else repr(key)  # a quoted TOML key may hold a newline: keep one line
        return RecipeError(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
                raise self.fail(f"{where}{key}", f"unknown key{hint}")

    def get(self, table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        value = table.get(key)
        if value is not None and (
            not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
        ):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.fail(f"{where}{key}", f"must be a {names.replace('str', 'string')}, got {value!r}")
        return value

    def reference(
        self, text: str, revision: str | None, key: str, params: Mapping[str, ParamValue]
    ) -> ModelRef:
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
        if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
            raise self.fail(
                key,
                f"{text!r} is neither an existing folder (relative to {self.root}) nor a Hub id like "
                '"org/name[@revision]"',
            )
        return ModelRef(text, repo_id=repo_id, revision=at_revision or revision, params=params)

    def path_of(self, text: str, key: str, root: Path | None = None) -> Path:
        """`text` as an absolute path, relative to `root` (the recipe's folder by default)."""
        try:
            path = ((root or self.root) / Path(text).expanduser()).resolve()
            path.exists()  # raises for a name the system refuses (too long), which later checks would not expect
            return path
        except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, an unknown ~user, a name too long
            raise self.fail(key, f"{text!r} is not a usable path ({exc})") from None

    def model(self, value: Any, key: str, method: Method, defaults: Mapping[str, ParamValue]) -> ModelRef:
        params = dict(defaults)
        if isinstance(value, str):
            return self.reference(value, None, key, params)
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a model reference string or a table with 'source', got {value!r}")
        allowed = ("source", "revision", *(p.name for p in method.model_params))
        self.check_keys(value, allowed, f"{key}.")
        source = self.get(value, "source", str, f"{key}.")
        if source is None:
            raise self.fail(f"{key}.source", "is required")
        for p in method.model_params:
            if p.name in value:
                params[p.name] = self.param(p, value[p.name], f"{key}.{p.name}")
        return self.reference(source, self.get(value, "revision", str, f"{key}."), key, params)

    def param(self, p: Param, value: Any, key: str) -> ParamValue:
        problem = p.check(value)
        if problem:
            raise self.fail(key, problem)
        return float(value) if p.type is float else value


def load_recipe(path: str | Path, output_dir: str | Path | None = None) -> Recipe:
    """Read and validate a recipe file. Raises `RecipeError` with one actionable line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
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
            f"{path}:{line}:{column}: TOML syntax error: {message[: where.start()].strip()}"
        ) from None
    return _build(_Reader(path), data, text, output_dir)


def _build(r: _Reader, data: dict[str, Any], text: str, output_dir: str | Path | None) -> Recipe:
    r.check_keys(data, ("method", "base", "models", "dtype", "parameters", "tokenizer", "output", "card"), "")
    method_name = r.get(data, "method", str, "")
    if method_name is None:
        raise r.fail("method", f"is required; one of {', '.join(METHODS)}")
    if method_name not in METHODS:
        close = difflib.get_close_matches(method_name.replace("-", "_"), METHODS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known methods: {', '.join(METHODS)}"
        raise r.fail("method", f"unknown method {method_name!r}; {hint}")
    method = METHODS[method_name]

    parameters = r.get(data, "parameters", dict, "") or {}
    r.check_keys(parameters, tuple(p.name for p in method.params + method.model_params), "parameters.")
    given = {
        p.name: r.param(p, parameters[p.name], f"parameters.{p.name}")
        for p in method.params
        if p.name in parameters
    }
    model_defaults = {
        p.name: r.param(p, parameters.get(p.name, p.default), f"parameters.{p.name}")
        for p in method.model_params
    }

    raw_models = data.get("models")
    if raw_models is None:
        raise r.fail("models", "is required: a list of model references to merge")
    if not isinstance(raw_models, list) or not raw_models:
        raise r.fail("models", "must be a non-empty list of model references or [[models]] tables")
    models = tuple(r.model(m, f"models[{i}]", method, model_defaults) for i, m in enumerate(raw_models))

    base = None
    if "base" in data:
        raw_base = data["base"]
        if isinstance(raw_base, dict):
            r.check_keys(raw_base, ("source", "revision"), "base.")
        base = r.model(raw_base, "base", METHODS["simple_average"], {})
    elif method.needs_base:
        raise r.fail(
            "base", f"is required by method {method.name!r}: the model the task vectors are taken from"
        )

    dtype = r.get(data, "dtype", str, "")
    if dtype is not None and dtype not in DTYPES:
        close = difflib.get_close_matches(dtype, DTYPES, n=1)
        raise r.fail(
            "dtype",
            f"unknown dtype {dtype!r}; "
            + (f"did you mean {close[0]!r}?" if close else f"one of {', '.join(DTYPES)}"),
        )

    tokenizer_table = r.get(data, "tokenizer", dict, "") or {}
    r.check_keys(tokenizer_table, ("source", "revision"), "tokenizer.")
    tokenizer_source = r.get(tokenizer_table, "source", str, "tokenizer.")
    tokenizer = None
    if tokenizer_source not in (None, "base"):
        tokenizer = r.model(tokenizer_table, "tokenizer", METHODS["simple_average"], {})

    out = r.get(data, "output", dict, "") or {}
    r.check_keys(out, ("dir", "repo", "private", "branch", "create_pr", "max_shard_size"), "output.")
    if output_dir is not None:
        out_dir = r.path_of(str(output_dir), "--output", Path.cwd())
    elif r.get(out, "dir", str, "output.") is not None:
        out_dir = r.path_of(out["dir"], "output.dir")
    else:
        out_dir = (Path.cwd() / "outputs" / r.path.stem).resolve()
    repo = r.get(out, "repo", str, "output.")
    if repo is not None and (not _REPO_ID.match(repo) or "/" not in repo or "--" in repo or ".." in repo):
        raise r.fail("output.repo", f'{repo!r} is not a Hub repo id like "your-name/Qwen2.5-1.5B-TIES"')
    try:
        max_shard_size = parse_size(out.get("max_shard_size", "5GB"))
    except ValueError as exc:
        raise r.fail("output.max_shard_size", str(exc)) from None
    branch = r.get(out, "branch", str, "output.")
    create_pr = bool(r.get(out, "create_pr", bool, "output."))
    if create_pr and branch not in (None, "main"):
        raise r.fail("output.create_pr", "a pull request targets main; drop 'branch' or 'create_pr'")
    output = OutputSpec(
        dir=out_dir,
        repo=repo,
        private=r.get(out, "private", bool, "output."),
        branch=branch,
        create_pr=create_pr,
        max_shard_size=max_shard_size,
    )

    card_table = r.get(data, "card", dict, "") or {}
    r.check_keys(
        card_table,
        ("template", "title", "description", "tags", "language", "license", "license_name", "license_link"),
        "card.",
    )
    template = r.get(card_table, "template", str, "card.")
    tags = r.get(card_table, "tags", list, "card.") or []
    language = r.get(card_table, "language", (str, list), "card.") or []
    language = [language] if isinstance(language, str) else language
    for key, values in (("tags", tags), ("language", language)):
        if not all(isinstance(v, str) and v for v in values):
            raise r.fail(f"card.{key}", "must be a list of non-empty strings")
    card = CardSpec(
        template=r.path_of(template, "card.template") if template else None,
        title=r.get(card_table, "title", str, "card."),
        description=r.get(card_table, "description", str, "card."),
        tags=tuple(tags),
        language=tuple(language),
        license=r.get(card_table, "license", str, "card."),
        license_name=r.get(card_table, "license_name", str, "card."),
        license_link=r.get(card_table, "license_link", str, "card."),
    )
    if card.template is not None and not card.template.is_file():
        raise r.fail("card.template", f"no such template file {card.template}")

    return Recipe(
        path=r.path.resolve(),
        text=text,
        method=method,
        parameters=method.resolve(given),
        models=models,
        base=base,
        tokenizer=tokenizer,
        dtype=dtype,
        output=output,
        card=card,
    )
