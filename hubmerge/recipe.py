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

__all__ = [
    "CardSpec",
    "EvalSpec",
    "ModelRef",
    "OutputSpec",
    "Recipe",
    "Requirement",
    "load_recipe",
    "parse_size",
]

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
    parameters: Mapping[str, ParamValue]  # method parameters, defaults filled in
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
        self.warnings: list[str] = []  # valid, but probably not what the author meant

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


_NOT_YAML = (
    "this looks like a YAML file (a mergekit config?); hubmerge recipes are TOML: see the README's "
    '"Recipe reference" section'
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
    return _build(_Reader(path), data, text, output_dir)


def _build(r: _Reader, data: dict[str, Any], text: str, output_dir: str | Path | None) -> Recipe:
    r.check_keys(
        data,
        (
            "method",
            "base",
            "models",
            "dtype",
            "parameters",
            "tokenizer",
            "output",
            "card",
            "eval",
            "allow_non_finite",
        ),
        "",
    )
    method_name = r.get(data, "method", str, "")
    if method_name is None:
        raise r.fail("method", f"is required; one of {', '.join(METHODS)}")
    if method_name not in METHODS:
        close = difflib.get_close_matches(method_name.replace("-", "_"), METHODS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known methods: {', '.join(METHODS)}"
        raise r.fail("method", f"unknown method {method_name!r}; {hint}")
    method = METHODS[method_name]

    parameters = r.get(data, "parameters", dict, "") or {}
    if parameters and not method.params + method.model_params:
        raise r.fail(f"parameters.{next(iter(parameters))}", f"{method.name} takes no parameters")
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
    weights = [float(m.params["weight"]) for m in models if "weight" in m.params]
    if method.name == "linear" and sum(weights) == 0:
        # linear divides by Σ wᵢ: a zero sum would write a model of NaN and Inf.
        raise r.fail(
            "models", f"the weights sum to 0 ({' + '.join(map(str, weights))}); linear divides by their sum"
        )
    warnings = r.warnings
    if not method.needs_base and len(models) == 1:
        # Allowed (a re-save of one model in another dtype or with another card), but rarely what is meant.
        warnings.append(f"{r.path}: models: {method.name} of one model writes a copy of it")
    if given.get("threshold") == 1:
        warnings.append(
            f"{r.path}: parameters.threshold = 1 is read as the fraction 1.0, keeping 100 % of each task vector "
            "(as FusionBench reads it); for 1 percent write 0.01"
        )

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
    r.check_keys(
        out,
        ("dir", "repo", "private", "branch", "create_pr", "max_shard_size", "max_disk", "stats"),
        "output.",
    )
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
    try:
        max_disk = parse_size(out["max_disk"]) if "max_disk" in out else None
    except ValueError as exc:
        raise r.fail("output.max_disk", str(exc)) from None
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
        max_disk=max_disk,
        stats=r.get(out, "stats", bool, "output.") is not False,
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
        allow_non_finite=bool(r.get(data, "allow_non_finite", bool, "")),
        warnings=tuple(warnings),
        **_eval_fields(r, data, base is not None),
    )


_EVAL_KEYS = (
    "tasks",
    "limit",
    "num_fewshot",
    "batch_size",
    "include_path",
    "device",
    "dtype",
    "sources",
    "allow_code_execution",
    "require",
    "sanity",
)
_DEVICE = re.compile(r"^(?:cpu|mps|cuda(?::\d+)?)$")
_RELATIVE = re.compile(r"^\s*(base|best_source)\s*(?:([+-])\s*(\d+(?:\.\d+)?)\s*)?$")


def _requirement(r: _Reader, task: str, value: Any, has_base: bool) -> Requirement:
    key = f"eval.require.{task}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Requirement(task, str(value), threshold=float(value))
    match = _RELATIVE.match(value) if isinstance(value, str) else None
    if match is None:
        raise r.fail(
            key,
            f'must be a score such as 0.40, or "best_source", "best_source - 0.02", "base", "base + 0.01"; got {value!r}',
        )
    reference, sign, amount = match.groups()
    if reference == "base" and not has_base:
        raise r.fail(key, 'compares with the base, but the recipe has none; use "best_source" or a number')
    offset = float(amount or 0) * (-1 if sign == "-" else 1)
    return Requirement(task, " ".join(value.split()), reference=reference, offset=offset)


def _eval_fields(r: _Reader, data: Mapping[str, Any], has_base: bool) -> dict[str, Any]:
    """`Recipe.eval` and `Recipe.sanity` from the `[eval]` table."""
    table = r.get(data, "eval", dict, "")
    if table is None:
        return {}
    r.check_keys(table, _EVAL_KEYS, "eval.")
    sanity = r.get(table, "sanity", bool, "eval.") is not False
    if set(table) <= {"sanity"}:
        return {"sanity": sanity}
    tasks = r.get(table, "tasks", list, "eval.")
    if not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise r.fail("eval.tasks", 'is required: a non-empty list of lm-eval task names, e.g. ["gsm8k"]')
    limit = r.get(table, "limit", (int, float), "eval.")
    if limit is not None and not ((limit >= 1 and float(limit).is_integer()) or 0 < limit < 1):
        raise r.fail(
            "eval.limit", f"must be a number of examples (>= 1) or a fraction below 1, got {limit!r}"
        )
    num_fewshot = r.get(table, "num_fewshot", int, "eval.")
    if num_fewshot is not None and num_fewshot < 0:
        raise r.fail("eval.num_fewshot", f"must be 0 or more, got {num_fewshot}")
    batch_size = r.get(table, "batch_size", int, "eval.") or 1
    if batch_size < 1:
        raise r.fail("eval.batch_size", f"must be 1 or more, got {batch_size}")
    include = r.get(table, "include_path", str, "eval.")
    include_path = (r.root / Path(include).expanduser()).resolve() if include else None
    if include_path is not None and not include_path.is_dir():
        raise r.fail("eval.include_path", f"no such folder {include_path} (relative to the recipe)")
    device = r.get(table, "device", str, "eval.") or "cpu"
    if not _DEVICE.match(device):
        raise r.fail("eval.device", f'must be "cpu", "cuda", "cuda:N" or "mps", got {device!r}')
    dtype = r.get(table, "dtype", str, "eval.") or "auto"
    if dtype not in ("auto", *DTYPES):
        raise r.fail("eval.dtype", f"must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    require = r.get(table, "require", dict, "eval.") or {}
    for task in require:
        if task not in tasks:
            raise r.fail(f"eval.require.{task}", f"is not one of eval.tasks ({', '.join(tasks)})")
    spec = EvalSpec(
        tasks=tuple(dict.fromkeys(t.strip() for t in tasks)),
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        include_path=include_path,
        device=device,
        dtype=dtype,
        sources=r.get(table, "sources", bool, "eval.") is not False,
        allow_code_execution=bool(r.get(table, "allow_code_execution", bool, "eval.")),
        require=tuple(_requirement(r, task, value, has_base) for task, value in require.items()),
    )
    return {"eval": spec, "sanity": sanity}
