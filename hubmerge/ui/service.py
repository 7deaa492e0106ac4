"""What the web app does, without the web: recipe text → problems at their lines, the plan, one job at a time
(a merge, with its `[eval]` when the recipe has one, or a search of its `[search]` values: progress, log,
cancel), and the push of a finished merge with a token the caller types or signed in with.

A recipe in the app is text, named by a path it is read "as" (`loads_recipe`): relative folders are read from
that path's folder, as the CLI reads them from the recipe file's. Every merge writes under the work
directory (`<work>/runs/<id>/<recipe name>`), whatever `[output] dir` says. Served publicly, local folders
are read only under the allowed root (none by default: Hub ids only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigImportError, HubmergeError, PublishError, RecipeError
from ..recipe.load import Recipe, loads_recipe, missing_folder

if TYPE_CHECKING:
    from ..api import MergeProgress, MergeResult
    from ..merging.plan import MergePlan
    from ..publish.hub import PushResult
    from ..search.run import SearchResult

__all__ = ["Job", "Problem", "Service", "Settings", "cli_line", "examples"]

RECIPES = Path(__file__).resolve().parents[2] / "recipes"  # the shipped recipes, in a source checkout
SMALL_FILE = 50 * 10**6  # files up to this size are offered as downloads (the weights are not)


def cli_line(exc: HubmergeError) -> list[str]:
    """The error as the CLI prints it after `hubmerge: error: `, one line per problem."""
    problems = exc.problems if isinstance(exc, ConfigImportError) else (str(exc),)
    return [" ".join(p.split()) for p in problems]


def examples(root: Path = RECIPES) -> dict[str, Path]:
    """The shipped recipes by their path under recipes/, tiny demos first."""
    if not root.is_dir():
        return {}
    found = sorted(root.rglob("*.toml"), key=lambda p: (not p.name.startswith("tiny"), p.as_posix()))
    return {p.relative_to(root).as_posix(): p for p in found}


@dataclass(frozen=True)
class Settings:
    work_dir: Path
    public: bool = False
    allowed_root: Path | None = None  # public mode: local folders are read only below it (None: none at all)
    default_name: Path = field(default_factory=lambda: Path.cwd() / "recipe.toml")  # a recipe given no path
    oauth: bool = False  # "Sign in with Hugging Face" (a Space with hf_oauth: true) beside the token field


@dataclass(frozen=True)
class Problem:
    """One error as the CLI words it, and the recipe line it points at, when it can be found."""

    message: str
    line: int | None


_SYNTAX = re.compile(r"^:(\d+):(\d+): ")
_KEY = re.compile(r"^: ([^:\s]+): ")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(r'^\s*((?:"[^"]*"|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|[A-Za-z0-9_-]+))*)\s*=')


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip().strip('"') for p in dotted.split("."))


def _key_path(key: str) -> tuple[str | int, ...]:
    """`models[1].weight` → ("models", 1, "weight")."""
    path: list[str | int] = []
    for part in key.split("."):
        name, *indexes = re.split(r"\[(\d+)\]", part)
        if name:
            path.append(name)
        path.extend(int(i) for i in indexes if i)
    return tuple(path)


def key_line(text: str, key: str) -> int | None:
    """The line (from 1) where the TOML `text` sets `key` (`parameters.threshold`, `models[1].weight`), or
    the line of the nearest enclosing key or table it names; None when none of it is written."""
    lines: dict[tuple[str | int, ...], int] = {}
    table: tuple[str | int, ...] = ()
    counts: dict[tuple[str | int, ...], int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header is not None:
            name = _parts(header.group(2))
            if header.group(1) == "[[":
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = (*name, index)
            else:
                table = name
            lines.setdefault(table, number)
            continue
        assign = _ASSIGN.match(line)
        if assign is not None:
            lines.setdefault((*table, *_parts(assign.group(1))), number)
    path = _key_path(key)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def problems(exc: HubmergeError, name: Path, text: str) -> list[Problem]:
    """`exc` as the CLI's lines, each with the recipe line it points at."""
    found = []
    prefix = str(name)
    for message in cli_line(exc):
        line = None
        rest = message[len(prefix) :] if message.startswith(prefix) else None
        if rest is not None:
            syntax = _SYNTAX.match(rest)
            key = _KEY.match(rest)
            if syntax is not None:
                line = int(syntax.group(1))
            elif key is not None:
                line = key_line(text, key.group(1))
        found.append(Problem(message, line))
    return found


@dataclass
class Job:
    """One merge or search: its progress, its log, and how it ended."""

    id: str
    owner: str  # the browser session (or API call) that started it; only it may cancel the job
    name: str
    kind: str = "merge"  # merge, search
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    state: str = "waiting"  # waiting, running, done, failed, cancelled
    progress: MergeProgress | None = None  # a merge's, after its first slice is written
    started: float = 0.0
    log: list[str] = field(default_factory=list)
    error: str | None = None
    result: MergeResult | None = None
    output: Path | None = None  # the merge's output folder, or the search's folder (its results files)
    search: SearchResult | None = None

    def search_results(self) -> dict[str, Any] | None:
        """A search's search_results.json as it stands (rewritten whole after every trial), once written."""
        from ..search.run import RESULTS_JSON

        file = self.output / RESULTS_JSON if self.output is not None and self.kind == "search" else None
        if file is None or not file.is_file():
            return None
        results: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
        return results

    def on_progress(self, progress: MergeProgress) -> None:
        self.progress = progress

    def eta(self) -> float | None:
        """Seconds left at the rate so far, once something was written."""
        p = self.progress
        if p is None or not p.written or not p.total:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed * (p.total - p.written) / p.written


class Service:
    """The app's state: settings, the one running job, the jobs waiting, each session's last result."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ids = itertools.count(1)
        self._slot = threading.Lock()  # one merge at a time, whatever started it
        self._lock = threading.Lock()
        self.waiting: list[Job] = []
        self.running: Job | None = None
        self.results: dict[str, MergeResult] = {}  # by owner: what the push button publishes

    # --- recipe text ------------------------------------------------------------------------------------

    def name(self, path: str | None) -> Path:
        """The path a recipe's text is read as: `path`, or the default name next to the work folder's user."""
        if not path or not path.strip():
            return self.settings.default_name
        return Path(path.strip()).expanduser().absolute()

    def load(self, text: str, path: str | None = None, output_dir: Path | None = None) -> Recipe:
        """The recipe `text` read as the file `path` (served publicly, with local folders refused outside the
        allowed root). Raises `HubmergeError` as the CLI would."""
        recipe = loads_recipe(text, self.name(path), output_dir)
        self._check_reads(recipe)
        return recipe

    def _check_reads(self, recipe: Recipe) -> None:
        if not self.settings.public:
            return
        root = self.settings.allowed_root
        local: list[tuple[str, Path]] = [
            (ref.text, ref.path)
            for ref in (recipe.base, *recipe.models, recipe.tokenizer)
            if ref is not None and ref.path is not None
        ]
        if recipe.card.template is not None:
            local.append(("card.template", recipe.card.template))
        if recipe.eval is not None and recipe.eval.include_path is not None:
            local.append(("eval.include_path", recipe.eval.include_path))
        if recipe.search is not None and recipe.search.texts is not None:
            local.append(("search.texts", recipe.search.texts))
        for text, path in local:
            if root is None:
                raise RecipeError(
                    f"{recipe.path}: {text!r} is a local path, and this public app reads none; name models "
                    'by their Hub id, such as "Qwen/Qwen2.5-1.5B"'
                )
            if not path.resolve().is_relative_to(root.resolve()):
                raise RecipeError(
                    f"{recipe.path}: {text!r} is outside {root}, the only folder this public app reads; use a "
                    "Hub id or a folder below it"
                )

    def validate(self, text: str, path: str | None = None) -> tuple[list[Problem], Recipe | None]:
        """The recipe's problems (none when it is valid) and, when valid, the recipe."""
        try:
            recipe = self.load(text, path)
            missing_folder(recipe)  # as `hubmerge validate` does
            return [], recipe
        except HubmergeError as exc:
            return problems(exc, self.name(path), text), None

    def plan_json(self, text: str, path: str | None = None) -> str:
        """The plan as `hubmerge plan --json` prints it."""
        from ..merging.report import plan_json

        return json.dumps(plan_json(self._plan(text, path)), indent=2)

    def plan_text(self, text: str, path: str | None = None) -> str:
        """The plan as `hubmerge plan` prints it."""
        from ..merging.report import plan_text

        return plan_text(self._plan(text, path))

    def _plan(self, text: str, path: str | None) -> MergePlan:
        from ..api import load_plan

        recipe = self.load(text, path)
        return load_plan(recipe, self._output(next(self._ids), recipe))

    def _output(self, number: int, recipe: Recipe) -> Path:
        # Gradio serves every file under the work folder to whoever names its path: a random part in each
        # run's folder keeps one visitor from fetching another's merge by guessing the time and number.
        run = f"{time.strftime('%Y%m%d-%H%M%S')}-{number}-{secrets.token_hex(16)}"
        return self.settings.work_dir / "runs" / run / recipe.path.stem

    # --- merge jobs -------------------------------------------------------------------------------------

    def submit(self, text: str, path: str | None, owner: str, kind: str = "merge") -> Job:
        """Validate the recipe (raising its error) and start its merge (`kind="search"`: its search) once the
        job before it is done."""
        recipe = self.load(text, path)
        if kind == "search":
            from ..search.run import search_spec

            search_spec(recipe, recipe.path)  # a recipe without [search] is refused here, not in the job
        number = next(self._ids)
        output = self._output(number, recipe)
        if kind == "search":
            output = output.with_name(output.name + "-search")
        job = Job(str(number), owner, recipe.path.name, kind, output=output)
        with self._lock:
            self.waiting.append(job)
        thread = threading.Thread(
            target=self._run, args=(job, recipe, output), name=f"hubmerge-ui-job-{number}"
        )
        thread.daemon = True
        thread.start()
        return job

    def _run(self, job: Job, recipe: Recipe, output: Path) -> None:
        with self._slot:
            with self._lock:
                self.waiting.remove(job)
                self.running = job
            job.state, job.started = "running", time.monotonic()
            try:
                if job.cancel.is_set():
                    raise HubmergeError(f"the {job.kind} was cancelled before it started")
                if job.kind == "search":
                    self._search(job, recipe, output)
                else:
                    self._merge(job, recipe, output)
            except HubmergeError as exc:
                job.state = "cancelled" if job.cancel.is_set() else "failed"
                job.error = "\n".join(cli_line(exc))
            except Exception as exc:  # a bug: one line, as the CLI says it, never a traceback on the page
                job.state = "failed"
                job.error = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
            finally:
                if job.state != "done" and job.kind == "merge":
                    # Only an empty run folder: what a failed merge left (nothing, by output.staged) stays
                    # visible rather than being swept away here.
                    with contextlib.suppress(OSError):
                        output.parent.rmdir()
                with self._lock:
                    self.running = None
                job.finished.set()

    def _merge(self, job: Job, recipe: Recipe, output: Path) -> None:
        from ..api import merge

        job.result = merge(
            recipe,
            output_dir=output,
            push=False,
            quiet=True,
            evaluate=recipe.eval is not None,  # [eval]'s table goes into the card
            sanity=os.environ.get("HUBMERGE_NO_SANITY") in (None, "", "0"),
            log=job.log.append,
            progress=job.on_progress,
            cancel=job.cancel,
        )
        self.results[job.owner] = job.result
        job.state = "done"

    def _search(self, job: Job, recipe: Recipe, output: Path) -> None:
        from ..search.run import search

        job.search = search(recipe, output_dir=output, log=job.log.append, cancel=job.cancel)
        job.state = "cancelled" if job.cancel.is_set() else "done"

    def cancel(self, owner: str) -> Job | None:
        """Cancel `owner`'s job, running or waiting; returns it (None when it has none)."""
        with self._lock:
            jobs = [j for j in (self.running, *self.waiting) if j is not None and j.owner == owner]
        for job in jobs:
            job.cancel.set()
        return jobs[0] if jobs else None

    def queue_status(self) -> str:
        with self._lock:
            running, waiting = self.running, len(self.waiting)
        verb = "searching" if running is not None and running.kind == "search" else "running"
        now = f"{verb} {running.name} (job {running.id})" if running else "idle"
        return f"{now}; {waiting} waiting"

    # --- results ----------------------------------------------------------------------------------------

    @staticmethod
    def downloads(result: MergeResult) -> list[Path]:
        """The output's files that are small enough to download from the page (not the weights)."""
        files = (result.output_dir / name for name in result.files)
        return [p for p in files if p.is_file() and p.stat().st_size <= SMALL_FILE]

    def push(self, owner: str, token: str, repo: str, private: bool) -> PushResult:
        """Publish `owner`'s last finished merge to `repo` with `token` (typed, or the visitor's OAuth token on a
        Space; never kept, never logged)."""
        from ..publish.hub import check_push_access, push

        result = self.results.get(owner)
        if result is None:
            raise PublishError("nothing to push: run a merge first; only a finished merge is pushed")
        repo = repo.strip()
        if not repo:
            raise PublishError("give the repo to push to, such as your-name/merged-model")
        token = token.strip()
        if not token and self.settings.public:
            way = "sign in with Hugging Face or paste" if self.settings.oauth else "paste"
            raise PublishError(f"{way} a Hugging Face write token to push (it is used for this push only)")
        plan = result.plan
        output = plan.recipe.output.model_copy(update={"repo": repo, "private": private})
        plan = dataclasses.replace(plan, recipe=dataclasses.replace(plan.recipe, output=output))
        check_push_access(plan, token or None)
        return push(plan, result.output_dir, token or None)


def read_lock(result: MergeResult) -> str:
    from ..publish.lock import LOCK_FILE

    return (result.output_dir / LOCK_FILE).read_text(encoding="utf-8")


def card_markdown(result: MergeResult) -> str:
    return (result.output_dir / "README.md").read_text(encoding="utf-8")


def lines_around(text: str, line: int, context: int = 2) -> Iterator[tuple[int, str]]:
    """The recipe's lines around `line`, numbered from 1."""
    all_lines = text.splitlines() or [""]
    start, stop = max(1, line - context), min(len(all_lines), line + context)
    for number in range(start, stop + 1):
        yield number, all_lines[number - 1]
