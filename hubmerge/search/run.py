"""`hubmerge search`: trials of a recipe's `[search]` values, each an ordinary merge scored and removed, in an
Optuna study that a rerun resumes; locally, or as Ray tasks on a cluster.

    recipe + [search] → study (DIR/study.db) → ask values → merge into DIR/trials/N → score → remove → tell
                                                                → search_results.json / .csv, best.toml

The study lives in Optuna's RDB storage on SQLite in the output folder, written only by this process (the
driver): a rerun of the same command loads it, and trials it finished are not run again. A trial that was
running when the previous run died (Ctrl-C, kill -9, a lost machine) is marked failed as "interrupted" and
its values are tried again in a new trial; it does not count against the budget. After every trial the
results files and best.toml are rewritten whole (write, then rename), so they always describe the study.

A trial (`run_trial`) is a plain function of picklable values, the same locally and in a Ray task: it writes
the trial's recipe (absolute paths) and merges it with the Python API (api.py), scores the output
(objective.py) and removes it. Any error is the trial's result ("failed" with its reason), never the
search's. With a pruner, the trial reports its objective after each stage of scoring and asks Optuna's
pruner, on a copy of the study's earlier trials taken when it started (`Pruning`), whether to stop; the
driver records the values and the verdict in the study.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from ..errors import HubmergeError, RecipeError
from ..publish.lock import LOCK_FILE
from ..recipe.load import Recipe, load_recipe
from ..recipe.schema import EvalTable
from ..recipe.write import toml_document
from .document import local_paths
from .objective import TrialPruned, direction, score
from .space import SearchSpec, Value, apply

__all__ = [
    "BEST_FILE",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "STUDY_FILE",
    "SearchResult",
    "run_trial",
    "search",
    "search_spec",
]

STUDY_FILE = "study.db"
RESULTS_JSON = "search_results.json"
RESULTS_CSV = "search_results.csv"
BEST_FILE = "best.toml"
PLOT_FILE = "search_objective.png"
PARAMS_PLOT_FILE = "search_params.png"
IMPORTANCE_PLOT_FILE = "search_importance.png"
TRIALS_DIR = "trials"  # scratch: one folder per running trial
_STUDY = "hubmerge-search"
_LOCK = ".search.lock"
_AS_WRITTEN = "as_written"  # user attr of the trial of the recipe's own values
_INTERRUPTED = "interrupted"  # user attr of a trial that was running when its search died
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --- one trial ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialJob:
    """Everything a trial needs, on whichever machine runs it."""

    number: int
    values: Mapping[str, Value]
    document: Mapping[str, Any]  # the recipe without [search], local paths absolute
    recipe: Path  # the recipe file: [eval]'s cache and include_path are relative to it
    spec: SearchSpec
    eval: EvalTable | None
    scratch: Path | None  # where the trial's folder is made, then removed; None: the machine's temp folder
    layers: int  # decoder layers of the model: where values per group of layers go
    study: str  # the study's fingerprint: trials of two searches on one machine never share a folder
    pruning: Pruning | None = None  # None: the trial is scored in one stage and never pruned


@dataclass(frozen=True)
class Pruning:
    """What a trial's pruner decides from, wherever the trial runs: the study's trials numbered before it, as
    they were when it started (so a decision does not depend on which trials finish first elsewhere)."""

    pruner: str  # "median" or "hyperband"
    direction: str
    earlier: tuple[Any, ...]  # optuna FrozenTrials


def _pruner(optuna: Any, name: str) -> Any:
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _reporter(pruning: Pruning, result: dict[str, Any]) -> Callable[[int, float], bool]:
    """`report(step, value)` for objective.score: records the value in `result` and asks Optuna's pruner,
    on a study in memory that holds the earlier trials (unfinished ones as failed), whether to stop."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction=optuna.study.StudyDirection[pruning.direction.upper()],
        sampler=optuna.samplers.RandomSampler(seed=0),  # draws nothing: the trial's values are the job's
        pruner=_pruner(optuna, pruning.pruner),
        study_name=_STUDY,
    )
    failed = optuna.trial.TrialState.FAIL
    for t in pruning.earlier:
        study.add_trial(t if t.state.is_finished() else optuna.trial.create_trial(state=failed))
    trial = study.ask()  # numbered as the real one: HyperbandPruner's brackets hash the number
    before = dict(study._storage.get_trial(trial._trial_id).system_attrs)
    result["intermediate"] = []

    def report(step: int, value: float) -> bool:
        result["intermediate"].append(value)
        trial.report(value, step)
        prune = bool(trial.should_prune())
        # What the pruner noted on the trial (successive halving's rungs), for the real one.
        after = study._storage.get_trial(trial._trial_id).system_attrs
        result["system_attrs"] = {k: v for k, v in after.items() if before.get(k, object()) != v}
        return prune

    return report


def _node() -> str:
    """The machine a trial runs on: its Ray node id inside a Ray task, else the host name."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()


def _weights(folder: Path) -> dict[str, str]:
    """The sha256 of each weights file, as the merge's lock records them: what `hubmerge best.toml` must equal."""
    record = json.loads((folder / LOCK_FILE).read_text(encoding="utf-8"))
    files = record["output"]["files"]
    return {name: entry["sha256"] for name, entry in files.items() if name.endswith(".safetensors")}


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Merge the recipe with the trial's values into scratch, score it, remove it: the trial's result."""
    from .. import api

    started = time.monotonic()
    scratch = job.scratch or Path(tempfile.gettempdir()) / "hubmerge-search"
    folder = scratch / f"{job.study[:12]}-trial-{job.number}"
    result: dict[str, Any] = {"number": job.number, "node": _node()}
    try:
        shutil.rmtree(folder, ignore_errors=True)  # a previous attempt's, on a retry
        folder.mkdir(parents=True)
        recipe = folder / "recipe.toml"
        recipe.write_text(
            toml_document(apply(job.document, job.spec, job.values, job.layers)), encoding="utf-8"
        )
        merged = api.merge(
            recipe, output_dir=folder / "merged", quiet=True, stats=False, sanity=False, log=lambda _: None
        )
        report = _reporter(job.pruning, result) if job.pruning is not None else None
        value, terms = score(merged.output_dir, job.spec, job.recipe, job.eval, report=report)
        result |= {
            "state": "complete",
            "score": value,
            "terms": terms,
            "weights": _weights(merged.output_dir),
        }
    except TrialPruned as exc:
        result |= {"state": "pruned", "error": str(exc)}
    except HubmergeError as exc:
        result |= {"state": "failed", "error": " ".join(str(exc).split())}
    except Exception as exc:  # a trial's bug or a library's error is that trial's result, not the search's
        result |= {"state": "failed", "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


# --- where trials run -----------------------------------------------------------------------------------


class _Local:
    """Trials one at a time in this process."""

    def __init__(self) -> None:
        self.queue: dict[int, TrialJob] = {}

    @property
    def capacity(self) -> int:
        return 1

    def submit(self, job: TrialJob) -> None:
        self.queue[job.number] = job

    def next_done(self) -> dict[str, Any]:
        number = next(iter(self.queue))
        return run_trial(self.queue.pop(number))

    def close(self) -> None:
        pass


def _trial_process(threads: int) -> None:
    """A side-by-side trial process: its share of the cores, and it dies with the search (Linux)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Pool:
    """Trials side by side in processes of this machine, each with its share of the cores."""

    def __init__(self, capacity: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.capacity = capacity
        threads = max(1, (os.cpu_count() or 1) // capacity)
        self.pool = ProcessPoolExecutor(
            capacity, multiprocessing.get_context("spawn"), initializer=_trial_process, initargs=(threads,)
        )
        self.running: dict[Any, int] = {}

    def submit(self, job: TrialJob) -> None:
        self.running[self.pool.submit(run_trial, job)] = job.number

    def next_done(self) -> dict[str, Any]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        number = self.running.pop(future)
        try:
            result: dict[str, Any] = future.result()
        except Exception as exc:  # the trial's process died (killed, out of memory)
            message = " ".join(str(exc).split()) or type(exc).__name__
            return {"number": number, "state": "failed", "error": message, "node": _node(), "seconds": None}
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def side_by_side(trial_memory: int, trial_disk: int, memory: int, disk: int, cpus: int) -> int:
    """How many trials fit on this machine at once: each needs `trial_memory` bytes of the `memory` available,
    `trial_disk` bytes of the `disk` free where trials write their merge, and a core of the `cpus`; at least
    one (a lone trial that does not fit fails with its own reason)."""
    return max(1, min(memory // max(trial_memory, 1), disk // max(trial_disk, 1), cpus))


def _local(spec: SearchSpec, recipe: Recipe, scratch: Path, log: Log) -> _Local | _Pool:
    """Trials one at a time, `[search] concurrency` side by side, or with "auto" as many as the machine holds
    (`side_by_side`: the plan's memory and disk per trial, the memory available, the free disk, the cores);
    never more than that."""
    if not spec.concurrency or spec.concurrency == 1:
        return _Local()
    from .. import api

    plan = api.load_plan(recipe)
    memory = max(plan.peak_memory_estimate, _SCORING_BYTES)
    scratch.mkdir(parents=True, exist_ok=True)
    available, free, cpus = _available_memory(), shutil.disk_usage(scratch).free, os.cpu_count() or 1
    fits = side_by_side(memory, plan.output_bytes, available, free, cpus)
    wanted = fits if spec.concurrency == "auto" else spec.concurrency
    if fits < wanted or spec.concurrency == "auto":
        log(
            f"{min(wanted, fits)} trials side by side: each needs about {memory / 2**30:.1f} GiB of memory and "
            f"{plan.output_bytes / 1e9:.2f} GB of disk ({available / 2**30:.1f} GiB available, "
            f"{free / 1e9:.1f} GB free, {cpus} cores)"
        )
    return _Pool(min(wanted, fits)) if min(wanted, fits) > 1 else _Local()


class _Ray:
    """Trials as Ray tasks, with the `[search.resources]` each; a task lost with its node is retried by Ray."""

    def __init__(self, address: str | None, spec: SearchSpec, concurrency: int | None, memory: int) -> None:
        # concurrency None: as many as the cluster's CPUs hold at [search.resources] cpus each
        try:
            import ray
        except ImportError:
            raise HubmergeError('searching on a Ray cluster needs Ray: pip install "hubmerge[ray]"') from None
        self.ray = ray
        self.owned = not ray.is_initialized()
        if self.owned:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        options = {
            "num_cpus": spec.cpus,
            "num_gpus": spec.gpus,
            "memory": spec.memory or memory,
            "max_retries": 3,
        }
        self.task = ray.remote(run_trial).options(**options)
        cpus = ray.cluster_resources().get("CPU", 1.0)  # type: ignore[no-untyped-call]
        self.capacity = concurrency or max(1, int(cpus // spec.cpus))
        self.pending: dict[Any, int] = {}

    def submit(self, job: TrialJob) -> None:
        # Each node merges into its own temp folder: the driver's output folder may not exist there.
        self.pending[self.task.remote(dataclasses.replace(job, scratch=None))] = job.number

    def next_done(self) -> dict[str, Any]:
        (ref,), _ = self.ray.wait(list(self.pending), num_returns=1)
        number = self.pending.pop(ref)
        try:
            result: dict[str, Any] = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # its retries spent: a node lost again, a worker killed
            reason = " ".join(str(exc).split())[:300]
            return {
                "number": number,
                "state": "failed",
                "error": f"Ray: {reason}",
                "node": None,
                "seconds": None,
            }
        return result

    def close(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        if self.owned:
            self.ray.shutdown()


def _layers(recipe: Recipe) -> int:
    """The decoder layers of the merged model (its config.json), for values searched per group of layers."""
    from .. import api

    return int(api.load_plan(recipe).config["num_hidden_layers"])


def trial_memory(recipe: Recipe) -> int:
    """Bytes of memory one trial needs: the merge's peak (the plan's estimate), or scoring the merged model
    layer by layer (forward.py: weights a 64 MiB chunk at a time; 0.60 GB measured at 1.5B), whichever is
    larger."""
    from .. import api

    return max(api.load_plan(recipe).peak_memory_estimate, _SCORING_BYTES)


_SCORING_BYTES = 1 << 30  # the 0.60 GB measured at 1.5B, with room for the tokenizer and Python


def _available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux `MemAvailable`, else free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# --- the study ------------------------------------------------------------------------------------------


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise HubmergeError('hubmerge search needs Optuna: pip install "hubmerge[search]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sampler(optuna: Any, spec: SearchSpec, existing: int, layers: int) -> Any:
    """The sampler of a study that holds `existing` trials: seeded `seed + existing`, except the grid, whose
    seed orders its points once for the whole study."""
    seed = None if spec.seed is None else spec.seed + existing
    if spec.sampler == "grid":

        class _Grid(optuna.samplers.GridSampler):  # type: ignore[misc]
            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                pass  # the search counts its budget itself; GridSampler's stop() only works in optimize()

        return _Grid({name: d.grid() for name, d in spec.values(layers).items()}, seed=spec.seed)
    if spec.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise HubmergeError(
                'the cmaes sampler needs the cmaes package: pip install "hubmerge[search]"'
            ) from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _fingerprint(document: Mapping[str, Any], spec: SearchSpec) -> str:
    """What makes two searches the same study: the recipe's values, the space, the objective, the sampler."""
    what = {
        "document": document,
        "space": [dataclasses.asdict(d) for d in spec.dimensions],
        "objective": dict(spec.objective),
        "texts": str(spec.texts),
        "sampler": spec.sampler,
        "seed": spec.seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _hold(directory: Path) -> IO[str]:
    """One search per output folder at a time: a lock held for the life of this process."""
    handle = open(directory / _LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held until the search ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise HubmergeError(
            f"another hubmerge search is running in {directory}; wait for it or stop it"
        ) from None
    return handle


def _counted(trial: Any) -> bool:
    """A finished trial that counts against the budget (an interrupted one was retried as another)."""
    return bool(trial.state.is_finished() and not trial.user_attrs.get(_INTERRUPTED))


def _retry_interrupted(study: Any, optuna: Any, log: Log) -> None:
    """Trials still running in the storage died with the previous run: mark them, and try their values again."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, _INTERRUPTED, True)
        study._storage.set_trial_user_attr(
            trial._trial_id, "error", "interrupted; its values are tried again"
        )
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        log(f"trial {trial.number} was interrupted; its values are tried again")


# --- what a search leaves -------------------------------------------------------------------------------

_STATES = {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned", "RUNNING": "running"}


def _record(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "params": dict(trial.params),
        "score": trial.value if trial.state.name == "COMPLETE" else None,
        "state": _STATES[trial.state.name],
        "node": attrs.get("node"),
        "seconds": attrs.get("seconds"),
        "error": attrs.get("error"),
        "terms": attrs.get("terms", {}),
        "weights": attrs.get("weights", {}),  # sha256 of each weights file the trial's merge wrote
        "as_written": bool(attrs.get(_AS_WRITTEN)),  # the recipe's own values
        # the objective after each stage of scoring (objective.py), when trials may be pruned
        "intermediate": [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)],
    }


def _write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


@dataclass(frozen=True)
class SearchResult:
    output_dir: Path
    trials: tuple[dict[str, Any], ...]  # as in search_results.json
    best: dict[str, Any] | None
    direction: str
    best_recipe: Path | None  # best.toml, once a trial completed
    importance: Mapping[str, float] = dataclasses.field(default_factory=dict)  # once the search ended


def _results(
    study: Any,
    spec: SearchSpec,
    recipe: Path,
    directory: Path,
    best_document: Callable[[Any, int, Any], str],
    importance: Mapping[str, float] | None = None,
) -> SearchResult:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name in _STATES]
    records = tuple(_record(t) for t in trials)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    best_record = _record(best) if best is not None else None
    written = next((t for t in complete if t.user_attrs.get(_AS_WRITTEN)), None)
    summary = {
        "recipe": str(recipe),
        "sampler": spec.sampler,
        "seed": spec.seed,
        "objective": dict(spec.objective),
        "direction": direction(spec),
        "trials": list(records),
        "best": best_record,
        "as_written": _record(written) if written is not None else None,
        "importance": dict(importance or {}),  # once the search ended (run.py _importance)
    }
    _write(directory / RESULTS_JSON, json.dumps(summary, indent=2) + "\n")
    paths = list(dict.fromkeys(name for r in records for name in r["params"]))
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["number", "state", "score", *paths, "seconds", "node", "error"])
    for r in records:
        writer.writerow(
            [
                r["number"],
                r["state"],
                r["score"],
                *(r["params"].get(p) for p in paths),
                r["seconds"],
                r["node"],
                r["error"],
            ]
        )
    _write(directory / RESULTS_CSV, rows.getvalue())
    best_path = None
    if best is not None:
        best_path = directory / BEST_FILE
        _write(best_path, best_document(best, sum(_counted(t) for t in trials), written))
    return SearchResult(directory, records, best_record, direction(spec), best_path, dict(importance or {}))


def _against_written(best: Any, written: Any) -> str:
    """The header's line on the recipe as written (the first trial), when it was tried."""
    if written is None:
        return ""
    if written.number == best.number:
        return f"The recipe as written (trial {written.number}) is the best found.\n"
    return (
        f"The recipe as written (trial {written.number}) scored {written.value!r}; the best is "
        f"{abs(best.value - written.value):.6g} better.\n"
    )


def _best_header(recipe: Path, spec: SearchSpec, best: Any, finished: int, written: Any) -> str:
    objective = " + ".join(f"{w:g}·{name}" for name, w in spec.objective.items())
    values = ", ".join(f"{path} = {value!r}" for path, value in best.params.items())
    return (
        f"Found by `hubmerge search {recipe.name}`: trial {best.number}, the best of {finished} finished trials\n"
        f"(sampler {spec.sampler}, seed {spec.seed}); objective {objective} ({direction(spec)}d): {best.value!r}.\n"
        f"Values: {values}.\n"
        + _against_written(best, written)
        + "A plain recipe: `hubmerge best.toml` merges the best trial again (the same weights) into best/ beside it."
    )


# --- the search -----------------------------------------------------------------------------------------


def search_spec(recipe: Recipe, where: str | Path) -> SearchSpec:
    """The recipe's `[search]` table; a recipe without one is an error that says how to add it."""
    if recipe.search is None:
        raise RecipeError(
            f'{where}: no [search] table; add one, e.g. [search.space] "parameters.scaling_factor" = '
            "{ low = 0.1, high = 1.5 }"
        )
    return recipe.search


def search(
    recipe_path: str | Path | Recipe,
    *,
    output_dir: str | Path | None = None,
    trials: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    log: Log = _stderr,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    cancel: threading.Event | None = None,
) -> SearchResult:
    """Run (or resume) the recipe's `[search]` and write its results into `output_dir`.

    `output_dir` defaults to the recipe's output folder with "-search" appended. `trials` overrides
    `[search] trials`. `ray=True` runs trials as Ray tasks on the cluster at `ray_address` (None: the
    RAY_ADDRESS environment variable, else a Ray instance on this machine). `on_trial` is called with each
    finished trial's record, in the order they finish. Setting `cancel` (from another thread) asks for no
    more trials: the search returns once the running ones are done, and a rerun resumes its study. A `Recipe`
    already loaded (`loads_recipe`) stands for its file.
    """
    recipe = recipe_path if isinstance(recipe_path, Recipe) else load_recipe(recipe_path)
    spec = search_spec(recipe, recipe.path if isinstance(recipe_path, Recipe) else recipe_path)
    spec = spec if trials is None else dataclasses.replace(spec, trials=trials)
    optuna = _require_optuna()
    out = recipe.output.dir
    directory = Path(output_dir).expanduser().resolve() if output_dir else out.with_name(out.name + "-search")
    directory.mkdir(parents=True, exist_ok=True)
    held = _hold(directory)
    try:
        return _search(recipe, spec, directory, optuna, ray, ray_address, log, on_trial, cancel)
    finally:
        held.close()


def _search(
    recipe: Any,
    spec: SearchSpec,
    directory: Path,
    optuna: Any,
    ray: bool,
    ray_address: str | None,
    log: Log,
    on_trial: Callable[[dict[str, Any]], None] | None,
    cancel: threading.Event | None = None,
) -> SearchResult:
    document = local_paths(recipe, None)
    fingerprint = _fingerprint(document, spec)
    layers = _layers(recipe) if spec.grouped else 0
    study = optuna.create_study(
        storage=f"sqlite:///{directory / STUDY_FILE}",
        study_name=_STUDY,
        direction=direction(spec),
        sampler=_sampler(optuna, spec, 0, layers),
        pruner=_pruner(optuna, spec.pruner),
        load_if_exists=True,
    )
    # A resumed study's sampler is seeded past the trials it holds, so that it does not draw them again.
    study.sampler = _sampler(optuna, spec, len(study.trials), layers)
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif known != fingerprint:
        raise HubmergeError(
            f"{directory} holds a search of another recipe, space, objective or sampler; choose another --output, "
            f"or remove {directory / STUDY_FILE} to start over"
        )
    _retry_interrupted(study, optuna, log)
    written = spec.as_written(layers)
    if not study.trials and written is not None and spec.sampler != "grid":
        # The recipe as written is the first trial: what the search finds is measured against it.
        study.enqueue_trial(written, user_attrs={_AS_WRITTEN: True})
    scratch = directory / TRIALS_DIR
    shutil.rmtree(scratch, ignore_errors=True)  # trials of a run that died; none is running (the lock)
    distributions = {name: d.distribution() for name, d in spec.values(layers).items()}
    budget = spec.trials
    if spec.sampler == "grid":
        budget = min(budget, len(study.sampler._all_grids))
    best_document = _best_writer(recipe, spec, directory, layers)
    use_ray = ray or bool(os.environ.get("RAY_ADDRESS"))
    runner: _Local | _Pool | _Ray = (
        _Ray(
            ray_address,
            spec,
            None if spec.concurrency == "auto" else spec.concurrency,
            trial_memory(recipe),
        )
        if use_ray
        else _local(spec, recipe, scratch, log)
    )
    started = time.monotonic()
    running: dict[int, Any] = {}
    seconds: list[float] = []  # durations of the trials this run finished, for the time left
    try:
        while True:
            counted = sum(_counted(t) for t in study.get_trials(deepcopy=False))
            in_time = spec.timeout is None or time.monotonic() - started < spec.timeout
            in_time = in_time and not (cancel is not None and cancel.is_set())
            while in_time and counted + len(running) < budget and len(running) < runner.capacity:
                trial = study.ask(distributions)
                running[trial.number] = trial
                pruning = None
                if spec.pruner != "none":
                    earlier = tuple(t for t in study.get_trials() if t.number < trial.number)
                    pruning = Pruning(spec.pruner, direction(spec), earlier)
                runner.submit(
                    TrialJob(
                        trial.number,
                        dict(trial.params),
                        document,
                        recipe.path,
                        spec,
                        recipe.eval,
                        scratch,
                        layers,
                        fingerprint,
                        pruning,
                    )
                )
            if not running:
                break
            result = runner.next_done()
            trial = running.pop(result["number"])
            _tell(study, optuna, trial, result)
            record = _results(study, spec, recipe.path, directory, best_document)
            if result.get("seconds") is not None:
                seconds.append(result["seconds"])
            log(progress_line(result, counted + 1, budget, record.best, seconds, runner.capacity))
            if on_trial is not None:
                on_trial(result)
    finally:
        runner.close()
    summary = _results(study, spec, recipe.path, directory, best_document, _importance(study, optuna, spec))
    _plots(summary, directory, log)
    return summary


def _importance(study: Any, optuna: Any, spec: SearchSpec) -> dict[str, float]:
    """Each searched value's share of the score's variance over the complete trials (Optuna's fANOVA, seeded by
    the study's seed), largest first; {} before two trials completed. A lone value's share is 1."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = list(dict.fromkeys(name for t in complete for name in t.params))
    if len(complete) < 2 or not names:
        return {}
    if len(names) == 1:
        return {names[0]: 1.0}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=spec.seed or 0)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {name: float(value) for name, value in found.items()}


def _plots(result: SearchResult, directory: Path, log: Log) -> None:
    """PLOT_FILE: each complete trial's score and the best so far, in trial order; PARAMS_PLOT_FILE: each
    searched value against the score; IMPORTANCE_PLOT_FILE: the values' importances."""
    from ..quality.plots import MISSING, Panel, available, bar_chart, line_chart, scatter_chart

    complete = [t for t in result.trials if t["state"] == "complete"]
    if not complete:
        return
    if not available():
        log(MISSING)
        return
    pick = min if result.direction == "minimize" else max
    best = [pick(t["score"] for t in complete[: i + 1]) for i in range(len(complete))]
    panel = Panel("score", {"trial": [t["score"] for t in complete], "best so far": best})
    line_chart(
        directory / PLOT_FILE,
        f"hubmerge search ({result.direction})",
        "trial",
        [t["number"] for t in complete],
        [panel],
    )
    names = list(dict.fromkeys(name for t in complete for name in t["params"]))
    mark = next(i for i, t in enumerate(complete) if result.best and t["number"] == result.best["number"])
    points = {name: [(t["params"][name], t["score"]) for t in complete] for name in names}
    scatter_chart(
        directory / PARAMS_PLOT_FILE, "each searched value against the score", "score", points, mark
    )
    if result.importance:
        importance = result.importance
        bar_chart(
            directory / IMPORTANCE_PLOT_FILE,
            "importance of each searched value (fANOVA)",
            list(importance),
            {"importance": list(importance.values())},
        )


def _tell(study: Any, optuna: Any, trial: Any, result: Mapping[str, Any]) -> None:
    for key in ("node", "seconds", "error", "terms", "weights"):
        if result.get(key) is not None:
            trial.set_user_attr(key, result[key])
    for step, value in enumerate(result.get("intermediate", ())):
        trial.report(value, step)
    for key, value in result.get("system_attrs", {}).items():
        study._storage.set_trial_system_attr(trial._trial_id, key, value)
    if result["state"] == "complete":
        study.tell(trial, result["score"])
    elif result["state"] == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def progress_line(
    result: Mapping[str, Any],
    done: int,
    budget: int,
    best: Mapping[str, Any] | None,
    seconds: list[float],
    capacity: int,
) -> str:
    """The line logged as a trial finishes: its result, trials done of the budget, the best so far, and the time
    left at the mean duration of the trials this run finished (`seconds`), `capacity` at a time."""
    state = result["state"]
    what = {"complete": f"score {result.get('score', 0):.6g}", "pruned": result.get("error")}.get(
        state, f"failed: {result.get('error')}"
    )
    best_text = f"best {best['score']:.6g} (trial {best['number']})" if best else "no trial complete yet"
    left = budget - done
    eta = ""
    if seconds and left > 0:
        eta = f"; ETA {timedelta(seconds=round(sum(seconds) / len(seconds) * -(-left // capacity)))}"
    return f"trial {result['number']} ({done}/{budget}) {what}; {best_text}{eta}"


def _best_writer(
    recipe: Any, spec: SearchSpec, directory: Path, layers: int
) -> Callable[[Any, int, Any], str]:
    document = local_paths(recipe, directory)
    document.setdefault("output", {})["dir"] = "best"

    def write(best: Any, finished: int, written: Any) -> str:
        header = _best_header(recipe.path, spec, best, finished, written)
        return toml_document(apply(document, spec, best.params, layers), header)

    return write
