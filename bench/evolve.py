"""mergekit-evolve next to `hubmerge search` on the skills demo (issue 18): best score, wall time, peak memory.

The problem is recipes/examples/skills-search.toml: task_arithmetic over the tiny `skills/` models (base +
adder + reverser), objective 0.5 * skills_add acc + 0.5 * skills_rev acc (lm-eval, the repo's own tasks),
a budget of 8 evaluations. hubmerge searches `scaling_factor` and the adder's weight with TPE (seed 0);
mergekit-evolve searches its genome for the same merge, one weight per task vector (layer_granularity 0,
no filters: w_adder * tau_adder + w_reverser * tau_reverser, which spans hubmerge's
scaling_factor * (w0 * tau_adder + tau_reverser)), with CMA-ES from its default x0 = (0.5, 0.5), sigma0 1/6,
population 4 (whole generations), CMA-ES seed 1 (mergekit passes `--random-seed` to the merge only). Note that
cma stops only once `countevals - 1 >= maxfevals` and then evaluates the final mean, so `--max-fevals 8`
runs 3 generations + 1 = 13 evaluations; the table reports the best of the first 8 too. `hubmerge-genome-*`
runs search hubmerge in the genome's own space (scaling_factor 1, both weights free in [0, 1.5]).

mergekit-evolve only runs where Ray offers GPUs: every strategy asks Ray for `num_gpus=1` per merge and per
evaluation (mergekit/evo/actors.py `@ray.remote(num_cpus=1, num_gpus=1.0)`, helpers.py
`merge_model_ray = ray.remote(num_cpus=1, num_gpus=1, ...)`, strategy.py's serial placement group
`{"CPU": 1, "GPU": 1}`), and the pool strategy sizes its pool by `torch.cuda.device_count()` unless
`--num-gpus` is given. On a CPU-only machine those requests never schedule. So this script starts Ray
itself with one *declared* GPU (`ray.init(num_gpus=1)`; Ray only counts it, nothing uses CUDA: torch is
the CPU build, `--no-merge-cuda` merges on the CPU and lm-eval's HF model is put on the CPU by the shim below) and
then calls mergekit-evolve's own click entry point in the same process: `--num-gpus 1`, on disk (merge to a
folder, evaluate it, delete it), no vLLM; `--strategy pool` (one evaluator actor) or `serial`. Four CPU-only
failures in mergekit 0.1.5 are worked around by a shim described at SHIM below.

Every run is timed by `/usr/bin/time -v` (wall, the driver's and its waited-for children's max RSS) and
by a sampler here that reads /proc every 0.2 s for the run's whole process tree (Ray's raylet, GCS and
workers are descendants of the driver here): the largest single process and the largest sum over the tree.

    python bench/evolve.py [--runs hubmerge,evolve-pool,hubmerge-13] [--venv bench/work/venv-evolve]
    python bench/evolve.py --runs hubmerge-genome-tpe,hubmerge-genome-cmaes
    python bench/evolve.py --runs evolve-serial        # evolve-pool-in-memory: fails, see bench/RESULTS.md

Run from the repository root with /work/venv (hubmerge) active; mergekit-evolve runs in its own venv
(`python -m venv bench/work/venv-evolve; pip install torch==2.13.0 "mergekit[evolve]==0.1.5"`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SKILLS = REPO / "recipes" / "examples" / "skills"
WORK = HERE / "work" / "evolve"


def _genome(work: Path) -> Path:
    """The mergekit-evolve config, with a copy of the tasks whose data files are absolute (Ray workers)."""
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name in ("skills_add", "skills_rev"):
        shutil.copy(SKILLS / "tasks" / f"{name}.jsonl", tasks / f"{name}.jsonl")
        text = (SKILLS / "tasks" / f"{name}.yaml").read_text()
        text = text.replace(f"recipes/examples/skills/tasks/{name}.jsonl", str(tasks / f"{name}.jsonl"))
        (tasks / f"{name}.yaml").write_text(text)
    config = work / "genome.yaml"
    config.write_text(
        "genome:\n"
        "  merge_method: task_arithmetic\n"
        f"  base_model: {SKILLS / 'base'}\n"
        "  models:\n"
        f"    - {SKILLS / 'adder'}\n"
        f"    - {SKILLS / 'reverser'}\n"
        "  layer_granularity: 0\n"
        "tasks:\n"
        "  - name: skills_add\n    weight: 0.5\n    metric: acc,none\n"
        "  - name: skills_rev\n    weight: 0.5\n    metric: acc,none\n"
        # hubmerge's [eval] scores the plain prompts; mergekit-evolve would wrap them in the chat template
        "apply_chat_template: false\n"
        "fewshot_as_multiturn: false\n"
    )
    return config


class TreeSampler(threading.Thread):
    """Peak RSS of one process and of a whole process tree, read from /proc every `period` seconds."""

    def __init__(self, root: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.max_one = self.max_sum = 0
        self.max_procs = 0
        self.done = threading.Event()

    def _tree(self) -> dict[int, int]:
        parent: dict[int, int] = {}
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = re.search(r"^PPid:\s+(\d+)", status, re.M)
            vm = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            if ppid:
                parent[int(entry)] = int(ppid.group(1))
                rss[int(entry)] = int(vm.group(1)) * 1024 if vm else 0
        tree = {self.root}
        changed = True
        while changed:
            changed = False
            for pid, pp in parent.items():
                if pp in tree and pid not in tree:
                    tree.add(pid)
                    changed = True
        return {pid: rss.get(pid, 0) for pid in tree}

    def run(self) -> None:
        while not self.done.is_set():
            tree = self._tree()
            if tree:
                self.max_one = max(self.max_one, max(tree.values()))
                self.max_sum = max(self.max_sum, sum(tree.values()))
                self.max_procs = max(self.max_procs, len(tree))
            self.done.wait(self.period)


def _timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run `nice -n 10 /usr/bin/time -v CMD`, return wall, time's max RSS and the sampler's peaks."""
    full = ["nice", "-n", "10", "/usr/bin/time", "-v", *cmd]
    started = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + " ".join(full) + "\n")
        out.flush()
        proc = subprocess.Popen(full, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.done.set()
        sampler.join()
    wall = time.monotonic() - started
    text = log.read_text()
    maxrss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {
        "rc": rc,
        "wall_s": round(wall, 1),
        "time_maxrss_gb": round(int(maxrss.group(1)) * 1024 / 1e9, 3) if maxrss else None,
        "tree_max_process_gb": round(sampler.max_one / 1e9, 3),
        "tree_max_sum_gb": round(sampler.max_sum / 1e9, 3),
        "tree_max_processes": sampler.max_procs,
        "log": str(log.relative_to(REPO)),
    }


def _genome_recipe(work: Path, sampler: str) -> Path:
    """hubmerge's recipe for mergekit-evolve's genome: scaling_factor 1, one free weight per task vector."""
    recipe = work / f"genome-{sampler}.toml"
    recipe.write_text(
        f'method = "task_arithmetic"\nbase = "{SKILLS / "base"}"\n'
        f'models = ["{SKILLS / "adder"}", "{SKILLS / "reverser"}"]\n'
        "[parameters]\nscaling_factor = 1.0\n"
        f'[eval]\ntasks = ["skills_add", "skills_rev"]\ninclude_path = "{SKILLS / "tasks"}"\n'
        "batch_size = 64\nsources = false\n"
        f'[search]\ntrials = 8\nsampler = "{sampler}"\nseed = 0\n'
        '[search.space]\n"models[0].weight" = { low = 0.0, high = 1.5 }\n'
        '"models[1].weight" = { low = 0.0, high = 1.5 }\n'
        "[search.objective]\nskills_add = 0.5\nskills_rev = 0.5\n"
    )
    return recipe


def run_hubmerge(work: Path, trials: int | None = None, sampler: str | None = None) -> dict[str, object]:
    name = f"hubmerge-genome-{sampler}" if sampler else f"hubmerge-{trials}" if trials else "hubmerge"
    recipe = str(_genome_recipe(work, sampler)) if sampler else "recipes/examples/skills-search.toml"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "hubmerge",
        "search",
        recipe,
        "--output",
        str(out),
        *(["--trials", str(trials)] if trials else []),
    ]
    # a fresh HF_HOME: hubmerge caches eval results per (model, task) under $HF_HOME/hubmerge/eval, and a warm
    # cache from an earlier run would skip every evaluation (the models are local, nothing is downloaded)
    hf_home = work / "hf-home"
    shutil.rmtree(hf_home, ignore_errors=True)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    row = _timed(cmd, work / f"{out.name}.log", env=env)
    results = json.loads((out / "search_results.json").read_text())
    scores = [t["score"] for t in results["trials"] if t["state"] == "complete"]
    row.update(
        run=f"hubmerge search ({recipe}, seed 0{f', --trials {trials}' if trials else ''})",
        evaluations=len(results["trials"]),
        scores=scores,
        best=results["best"]["score"],
        best_of_first_8=max(scores[:8]) if scores else None,
        best_params=results["best"]["params"],
    )
    return row


# CPU-only blockers in mergekit 0.1.5 (besides the GPU requests, see the module docstring) that this script works around, in the driver and in every Ray worker
# (a sitecustomize.py on PYTHONPATH that acts just before the `mergekit.evo` package is first imported):
# 1. mergekit/evo/actors.py line 137 annotates a class attribute with `lm_eval.models.vllm_causallms.VLLM`,
#    evaluated when the module is imported; lm_eval 0.4.13 (what pip resolves) imports its model modules
#    lazily and vllm_causallms needs vllm, so without vllm `import mergekit.evo.actors` fails:
#    AttributeError: module 'lm_eval.models' has no attribute 'vllm_causallms'. vllm is not installed for this
#    CPU-only run, so the shim registers an empty stand-in module; no code path uses it (`--no-vllm`). The same
#    import is also made by helpers.py `evaluate_model` (line 62, `monkeypatch_lmeval_vllm()`), in the
#    serial strategy's evaluation workers: ModuleNotFoundError: No module named 'vllm'.
# 2. OnDiskMergeEvaluator.evaluate_genotype (actors.py line 97) calls
#    `get_torch_accelerator_module("cpu").empty_cache()`, i.e. torch.cpu.empty_cache, which torch 2.13 does
#    not have: AttributeError: module 'torch.cpu' has no attribute 'empty_cache', on every evaluation. The
#    shim gives torch.cpu a no-op empty_cache.
# 3. mergekit/evo/helpers.py evaluate_model passes lm-eval only `pretrained`, `dtype`, `use_cache`, never a
#    device, and lm-eval's HFLM defaults to device="cuda" (lm_eval/models/huggingface.py line 86), which it
#    keeps without CUDA (line 280 lists "cuda" as valid), so transformers' from_pretrained fails:
#    AssertionError: Torch not compiled with CUDA enabled. The shim makes HFLM's default device "cpu" when
#    torch has no CUDA.
SHIM = """\
import sys
import types


class _BeforeMergekitActors:
    def find_spec(self, name, path=None, target=None):
        if name != "mergekit.evo":
            return None
        sys.meta_path.remove(self)
        import torch

        if not hasattr(torch.cpu, "empty_cache"):
            torch.cpu.empty_cache = lambda: None
        try:
            import lm_eval.models.vllm_causallms  # noqa: F401
        except ImportError:
            import lm_eval.models

            stub = types.ModuleType("lm_eval.models.vllm_causallms")
            stub.VLLM = type("VLLM", (), {})
            sys.modules[stub.__name__] = stub
            lm_eval.models.vllm_causallms = stub
        if not torch.cuda.is_available():
            import lm_eval.models.huggingface as hf

            init = hf.HFLM.__init__

            def cpu_init(self, *args, device="cpu", **kwargs):
                init(self, *args, device="cpu" if device == "cuda" else device, **kwargs)

            hf.HFLM.__init__ = cpu_init
        return None


sys.meta_path.insert(0, _BeforeMergekitActors())
"""


def run_evolve(work: Path, venv: Path, strategy: str, in_memory: bool) -> dict[str, object]:
    storage = work / "evolve-storage"
    shutil.rmtree(storage, ignore_errors=True)
    config = _genome(work)
    args = [
        str(config), "--storage-path", str(storage), "--max-fevals", "8", "--force-population-size", "4",
        "--strategy", strategy, "--num-gpus", "1", "--in-memory" if in_memory else "--no-in-memory", "--no-vllm", "--no-merge-cuda",
        "--random-seed", "0", "--batch-size", "64", "--task-search-path", str(work / "tasks"),
        "--no-save-final-model",
    ]  # fmt: skip
    cmd = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--inner-evolve", *args]
    shim = work / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(shim)}
    log = work / f"evolve-{strategy}{'-in-memory' if in_memory else ''}.log"
    row = _timed(cmd, log, env=env)
    text = log.read_text()
    # each evaluation's score, in the order CMA-ES received them (printed by the --inner-evolve driver)
    scores = [float(s) for s in re.findall(r"^EVAL score ([-\d.e]+|None)$", text, re.M) if s != "None"]
    best = re.findall(r"^Best cost: (-?[\d.]+)", text, re.M)
    row.update(
        run=f"mergekit-evolve 0.1.5 (CMA-ES, pop 4, --strategy {strategy}{' --in-memory' if in_memory else ''})",
        evaluations=len(re.findall(r"^EVAL score", text, re.M)),
        scores=scores,
        best=max(scores) if scores else None,
        best_of_first_8=max(scores[:8]) if scores else None,
        best_cost_line=best[-1] if best else None,
        genotypes=re.findall(r"^EVAL genotype (.*)$", text, re.M),
        best_config=(storage / "best_config.yaml").read_text()
        if (storage / "best_config.yaml").exists()
        else None,
    )
    return row


def _inner_evolve(argv: list[str]) -> None:
    """In the mergekit venv: start Ray with one declared GPU, log each evaluation's score, run mergekit-evolve."""
    import cma
    import numpy as np
    import ray
    from mergekit.evo import strategy
    from mergekit.scripts.evolve import main

    fmin2 = cma.fmin2

    def seeded_fmin2(*args, options=None, **kwargs):  # type: ignore[no-untyped-def]
        return fmin2(
            *args,
            options={**(options or {}), "seed": 1, "verb_filenameprefix": f"{WORK}/outcmaes/"},
            **kwargs,
        )

    cma.fmin2 = seeded_fmin2
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    cls = {"pool": strategy.ActorPoolEvaluationStrategy, "serial": strategy.SerialEvaluationStrategy}[
        argv[argv.index("--strategy") + 1]
    ]
    original = cls.evaluate_genotypes

    def logged(self, genotypes):  # type: ignore[no-untyped-def]
        res = original(self, genotypes)
        for x, r in zip(genotypes, res, strict=True):
            print(
                f"EVAL genotype {np.round(np.asarray(x), 4).tolist()} results {r['results'] and {k: v.get('acc,none') for k, v in r['results'].items()}}"
            )
            print(f"EVAL score {r['score']}", flush=True)
        return res

    cls.evaluate_genotypes = logged
    main(argv, standalone_mode=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inner-evolve"]:
        _inner_evolve(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs",
        default="hubmerge,evolve-pool",
        help="hubmerge, hubmerge-N (N trials), hubmerge-genome-tpe|cmaes|random, evolve-serial, evolve-pool, evolve-pool-in-memory",
    )
    p.add_argument("--venv", type=Path, default=HERE / "work" / "venv-evolve")
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    rows = []
    for run in args.runs.split(","):
        if run.startswith("hubmerge-genome-"):
            row = run_hubmerge(WORK, sampler=run.removeprefix("hubmerge-genome-"))
        elif run.startswith("hubmerge"):
            row = run_hubmerge(WORK, int(run.split("-")[1]) if "-" in run else None)
        else:
            strategy = run.removeprefix("evolve-").removesuffix("-in-memory")
            row = run_evolve(WORK, args.venv.resolve(), strategy, run.endswith("-in-memory"))
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    (WORK / f"results-{args.runs}.json").write_text(
        json.dumps({"load_1min_before": load, "rows": rows}, indent=1)
    )
    print(f"1-minute load before the runs: {load:.1f}")
    print(
        "| run | rc | evaluations | best score | best of first 8 | wall s | time -v max RSS GB "
        "| tree max process GB | tree max sum GB |"
    )
    for r in rows:
        best, first8 = (f"{v:.4f}" if isinstance(v, float) else v for v in (r["best"], r["best_of_first_8"]))
        print(
            f"| {r['run']} | {r['rc']} | {r['evaluations']} | {best} | {first8} | {r['wall_s']} | {r['time_maxrss_gb']} "
            f"| {r['tree_max_process_gb']} | {r['tree_max_sum_gb']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
