"""Evaluation: lm-evaluation-harness on the merged model (and its sources), a result cache, and the gate.

lm-eval is an optional extra (`pip install "hubmerge[eval]"`), used through its Python API:
`lm_eval.simple_evaluate` with an `HFLM` built from the local model folder, `trust_remote_code=False`, and a
`TaskManager` that also reads the recipe's `include_path`. Tasks that execute model-written code (humaneval,
mbpp) run only with `[eval] allow_code_execution = true`. Every model is evaluated with the output's
tokenizer, the one the merge ships.

Results are cached per (model, task): the key is the model's identity (`repo@sha` for a Hub source, the
sha256 of its config and weight files otherwise), the tokenizer's files, the task, the settings, the custom
task files and the lm-eval version. The cache lives under `$HF_HOME/hubmerge/eval`, so a re-run evaluates
only what changed, in practice the new merge.

Scores are kept per task and metric in lm-eval's order (`"acc,none"`: metric, filter); the first metric of a
task is its primary one, which the gate (`[eval] require`) and the chart use.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EvalError, RecipeError
from ..publish.files import CHART_FILE, CONFIG_FILE, RESULTS_FILE
from ..publish.lock import file_sha256
from ..recipe.schema import EvalTable, Requirement
from ..sources.resolve import TOKENIZER_FILES

__all__ = [
    "CHART_FILE",
    "RESULTS_FILE",
    "Check",
    "Evaluation",
    "ModelResult",
    "Score",
    "cache_dir",
    "evaluate_models",
    "model_identity",
    "require_lm_eval",
    "results_table",
    "summary_markdown",
]

INSTALL = 'pip install "hubmerge[eval]"'
# lm-eval's default is 100000 resamples, minutes for corpus metrics; 1000 gives stderr to two digits.
_BOOTSTRAP_ITERS = 1000
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None
    higher_is_better: bool


@dataclass(frozen=True)
class ModelResult:
    role: str  # "merged", "base" or "model"
    name: str  # for tables: "merged", or the source as the recipe names it
    identity: str  # what the cache key is made of
    scores: Mapping[str, Mapping[str, Score]]  # task -> metric -> score, primary metric first
    cached: bool  # every task came from the cache

    def primary(self, task: str) -> tuple[str, Score]:
        return next(iter(self.scores[task].items()))


@dataclass(frozen=True)
class Check:
    """One `[eval] require` entry checked against the results."""

    requirement: Requirement
    metric: str
    required: float
    value: float
    higher_is_better: bool
    passed: bool

    def describe(self) -> str:
        r = self.requirement
        bound = "at least" if self.higher_is_better else "at most"
        return (
            f"{r.task} {self.metric} = {self.value:.4f}, required {bound} {self.required:.4f} ({r.text}): "
            f"{'passed' if self.passed else 'MISSED'}"
        )


@dataclass(frozen=True)
class Evaluation:
    lm_eval_version: str
    settings: Mapping[str, Any]
    models: tuple[ModelResult, ...]  # the merge first, then base and models in recipe order
    checks: tuple[Check, ...] = ()

    @property
    def merged(self) -> ModelResult:
        return self.models[0]

    @property
    def missed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def rows(self) -> list[tuple[str, str, list[Score]]]:
        """(task, metric, one score per model) for every metric of every task, in order."""
        return [
            (task, metric, [m.scores[task][metric] for m in self.models])
            for task, metrics in self.merged.scores.items()
            for metric in metrics
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "lm_eval_version": self.lm_eval_version,
            "settings": dict(self.settings),
            "models": [
                {
                    "role": m.role,
                    "name": m.name,
                    "identity": m.identity,
                    "cached": m.cached,
                    "results": {
                        task: {
                            metric: {
                                "value": s.value,
                                "stderr": s.stderr,
                                "higher_is_better": s.higher_is_better,
                            }
                            for metric, s in metrics.items()
                        }
                        for task, metrics in m.scores.items()
                    },
                }
                for m in self.models
            ],
            "require": [
                {
                    "task": c.requirement.task,
                    "rule": c.requirement.text,
                    "metric": c.metric,
                    "required": c.required,
                    "value": c.value,
                    "higher_is_better": c.higher_is_better,
                    "passed": c.passed,
                }
                for c in self.checks
            ],
        }


def require_lm_eval() -> str:
    """lm-eval's version; raises `EvalError` naming the install command when the extra is missing."""
    try:
        import lm_eval
        import matplotlib  # noqa: F401  # the results chart
        from lm_eval.models.huggingface import HFLM  # noqa: F401  # needs accelerate, part of the extra
    except ImportError as exc:
        raise EvalError(
            f"evaluation needs lm-evaluation-harness, which is not installed ({exc.name} is missing); "
            f"run: {INSTALL}"
        ) from None
    return str(lm_eval.__version__)


def cache_dir() -> Path:
    """Where results are cached: `$HF_HOME/hubmerge/eval` (HF_HOME defaults to ~/.cache/huggingface)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home) / "hubmerge" / "eval"


def _files_digest(folder: Path, names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}\0{file_sha256(folder / name)}\n".encode())
    return digest.hexdigest()


def model_identity(folder: Path, repo_id: str | None = None, sha: str | None = None) -> str:
    """`repo@sha` for a Hub source, else the sha256 of the folder's config.json and weight files."""
    if repo_id is not None and sha is not None:
        return f"{repo_id}@{sha}"
    names = [p.name for p in folder.iterdir() if p.name == CONFIG_FILE or p.name.endswith(_WEIGHT_SUFFIXES)]
    return f"sha256:{_files_digest(folder, names)}"


def _tokenizer_identity(folder: Path) -> str:
    return _files_digest(folder, [n for n in TOKENIZER_FILES if (folder / n).is_file()])


def _include_identity(spec: EvalTable) -> str | None:
    if spec.include_path is None:
        return None
    root = spec.include_path
    return _files_digest(root, [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()])


def settings_json(spec: EvalTable) -> dict[str, Any]:
    return {
        "tasks": list(spec.tasks),
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "batch_size": spec.batch_size,
        "device": spec.device,
        "dtype": spec.dtype,
    }


def _cache_key(identity: str, tokenizer: str, task: str, spec: EvalTable, version: str) -> str:
    settings = settings_json(spec)
    del settings["tasks"]
    fields = [identity, tokenizer, task, settings, _include_identity(spec), version]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _read_cache(key: str) -> dict[str, Score] | None:
    path = cache_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {metric: Score(**score) for metric, score in data.items()}
    except (OSError, ValueError, TypeError):
        return None  # absent or unreadable: evaluate again


def _write_cache(key: str, scores: Mapping[str, Score]) -> None:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        m: {"value": s.value, "stderr": s.stderr, "higher_is_better": s.higher_is_better}
        for m, s in scores.items()
    }
    partial = directory / f".{key}.{os.getpid()}.partial"
    partial.write_text(json.dumps(data), encoding="utf-8")
    partial.replace(directory / f"{key}.json")  # atomic: a reader never sees half an entry


def _task_manager(spec: EvalTable, recipe: Path) -> Any:
    from lm_eval.tasks import TaskManager

    if spec.include_path is not None:
        # Indexing lm-eval's own ~15,000 task files takes many seconds: skip it when the recipe's folder has them all.
        custom = TaskManager(include_path=str(spec.include_path), include_defaults=False)
        if all(t in custom.all_tasks for t in spec.tasks):
            return custom
    manager = TaskManager(include_path=str(spec.include_path) if spec.include_path else None)
    for task in spec.tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see `lm-eval ls tasks`"
            raise RecipeError(f"{recipe}: eval.tasks: lm-eval has no task {task!r}; {hint}")
    return manager


@contextlib.contextmanager
def _code_execution(allowed: bool) -> Iterator[None]:
    """HF_ALLOW_CODE_EVAL=1 (the `evaluate` library's code_eval switch) only while an allowed run lasts."""
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = previous


@contextlib.contextmanager
def _library_output_captured() -> Iterator[None]:
    """What lm-eval and transformers write while they run, to a temporary file instead of the terminal: their
    progress bars, and the `fatal: not a git repository` of the `git describe` lm-eval runs to record its
    version (a child process, so only the file descriptors catch it). Shown afterwards when logging is on
    (`HUBMERGE_DEBUG=1` on the command line, or a Python caller that has not turned it off)."""
    import logging
    import sys
    import tempfile

    with tempfile.TemporaryFile() as captured:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if logging.root.manager.disable < logging.CRITICAL:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))


def _stderr(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _scores(results: Mapping[str, Any], higher: Mapping[str, bool]) -> dict[str, Score]:
    """lm-eval's result entry for one task (`{"acc,none": 0.5, "acc_stderr,none": 0.1, ...}`) as scores."""
    scores: dict[str, Score] = {}
    for key, value in results.items():
        name, _, filter_name = key.partition(",")
        if not filter_name or name.endswith("_stderr") or isinstance(value, bool):
            continue  # alias, name, sample counts, and the stderr read below
        if isinstance(value, (int, float)):
            stderr = _stderr(results.get(f"{name}_stderr,{filter_name}"))
            scores[key] = Score(float(value), stderr, bool(higher.get(name, True)))
    return scores


def _run(
    folder: Path, tokenizer: Path, tasks: Sequence[str], spec: EvalTable, manager: Any, recipe: Path
) -> dict[str, dict[str, Score]]:
    with _library_output_captured():
        return _evaluate_folder(folder, tokenizer, tasks, spec, manager, recipe)


def _evaluate_folder(
    folder: Path, tokenizer: Path, tasks: Sequence[str], spec: EvalTable, manager: Any, recipe: Path
) -> dict[str, dict[str, Score]]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    try:
        model = HFLM(
            pretrained=str(folder),
            tokenizer=str(tokenizer),
            device=spec.device,
            dtype=spec.dtype,
            batch_size=spec.batch_size,
            trust_remote_code=False,
        )
    except Exception as exc:
        raise EvalError(f"lm-eval cannot load {folder} ({type(exc).__name__}: {exc})") from None
    try:
        with _code_execution(spec.allow_code_execution):
            out = lm_eval.simple_evaluate(
                model=model,
                tasks=list(tasks),
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=_BOOTSTRAP_ITERS,
                confirm_run_unsafe_code=spec.allow_code_execution,
            )
    except ValueError as exc:
        if "unsafe" in str(exc):
            raise RecipeError(
                f"{recipe}: eval.tasks: {' '.join(str(exc).split())}; such a task runs code the model writes on this "
                "machine: set [eval] allow_code_execution = true only if you accept that"
            ) from None
        raise EvalError(f"lm-eval failed on {folder}: {exc}") from None
    except Exception as exc:  # a task's dataset missing offline, a metric failing: lm-eval's own errors
        raise EvalError(
            f"lm-eval failed on {folder} ({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from None
    if out is None:
        raise EvalError(f"lm-eval returned no results for {folder}")
    found: dict[str, dict[str, Score]] = {}
    for task in tasks:
        if task not in out["results"]:
            raise EvalError(
                f"lm-eval returned no score for task {task!r} (a group without an aggregate score?)"
            )
        found[task] = _scores(out["results"][task], out.get("higher_is_better", {}).get(task, {}))
    return found


@dataclass(frozen=True)
class Candidate:
    """A model to evaluate: its role and name for the table, its folder, and its Hub pin when it has one."""

    role: str
    name: str
    folder: Path
    repo_id: str | None = None
    sha: str | None = None


def evaluate_models(
    candidates: Sequence[Candidate], tokenizer: Path, spec: EvalTable, recipe: Path, log: Any
) -> Evaluation:
    """Evaluate every candidate on `spec.tasks` (cached results reused), then check `spec.require`."""
    version = require_lm_eval()
    token_id = _tokenizer_identity(tokenizer)
    manager: Any = None
    results = []
    for c in candidates:
        identity = model_identity(c.folder, c.repo_id, c.sha)
        keys = {task: _cache_key(identity, token_id, task, spec, version) for task in spec.tasks}
        scores = {task: found for task in spec.tasks if (found := _read_cache(keys[task])) is not None}
        missing = [t for t in spec.tasks if t not in scores]
        if missing:
            log(f"evaluating {c.name} on {', '.join(missing)}")
            manager = manager or _task_manager(spec, recipe)
            for task, found in _run(c.folder, tokenizer, missing, spec, manager, recipe).items():
                _write_cache(keys[task], found)
                scores[task] = found
        else:
            log(f"{c.name}: results from the cache")
        ordered = {task: scores[task] for task in spec.tasks}
        results.append(ModelResult(c.role, c.name, identity, ordered, cached=not missing))
    evaluation = Evaluation(version, settings_json(spec), tuple(results))
    return Evaluation(version, evaluation.settings, evaluation.models, _checks(evaluation, spec.require))


def _checks(evaluation: Evaluation, require: Sequence[Requirement]) -> tuple[Check, ...]:
    checks = []
    for r in require:
        metric, score = evaluation.merged.primary(r.task)
        sign = 1 if score.higher_is_better else -1
        if r.threshold is not None:
            required = r.threshold
        else:
            role = "base" if r.reference == "base" else "model"
            values = [m.scores[r.task][metric].value for m in evaluation.models[1:] if m.role == role]
            if not values:
                raise EvalError(
                    f"[eval] require.{r.task} = {r.text!r} compares with sources that were not evaluated"
                )
            best = max(values, key=lambda v: sign * v)
            required = best + sign * r.offset
        passed = sign * score.value >= sign * required
        checks.append(Check(r, metric, required, score.value, score.higher_is_better, passed))
    return tuple(checks)


def results_table(evaluation: Evaluation) -> str:
    """The results table in Markdown: the merge, then each source with the merge's difference to it. Task,
    metric and model names come from the recipe and lm-eval: each is a code span, inert in a job summary."""
    from ..publish.markdown import code, text

    header = ["Task", "Metric", text(evaluation.merged.name)]
    for m in evaluation.models[1:]:
        header += [code(m.name), "Δ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, metric, scores in evaluation.rows():
        merged = scores[0].value
        cells = [code(task), code(metric), f"{merged:.4f}"]
        for s in scores[1:]:
            cells += [f"{s.value:.4f}", f"{merged - s.value:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(evaluation: Evaluation) -> str:
    """The job summary section: the results table and the `[eval] require` checks."""
    from ..publish.markdown import text

    checks = "".join(f"- {'✅' if c.passed else '❌'} {text(c.describe())}\n" for c in evaluation.checks)
    return f"\n### Evaluation\n\n{results_table(evaluation)}" + (f"\n{checks}" if checks else "")
