"""Reproduce bench/RESULTS.md: hubmerge against the machine's own I/O floor, measured in the same run.

For every shape (Qwen2.5-0.5B / 1.5B layouts), number of fine-tunes and method it
  1. makes the checkpoints it needs (`make_checkpoints.py`, deterministic, under bench/work/),
  2. writes the recipes (and mergekit configs) under bench/work/configs/ with paths relative to them,
  3. alternates, `--repeats` times: the I/O floor (a child process that reads exactly the input files the
     method needs and writes a buffered file of the output's size), then hubmerge (`python -m hubmerge.cli`)
     and, with `--with-mergekit`, mergekit 0.1.5. Before each run every input is read once so the page
     cache is warm for all of them alike. Wall time comes from `time.perf_counter` around the child, peak
     RSS from the child's own rusage (`os.wait4`), and the 1-minute load average is recorded before each,
  4. writes the medians, the machine, the versions and what exactly ran to RESULTS.md (and every single
     measurement to bench/work/results.jsonl).

    python bench/run.py                                # 0.5B, 3 fine-tunes, all methods, 3 repeats
    python bench/run.py --shape 1.5b --models 2,3,5    # the scaling table
    python bench/run.py --with-mergekit                # also mergekit 0.1.5 in bench/work/venv-mergekit
    python bench/run.py --shape 1.5b --methods dare_ties,slerp,model_stock --with-mergekit

mergekit (and FusionBench, `--with-fusionbench`, installed only: see RESULTS.md) get their own virtual
environments under bench/work/, with torch==2.13.0 installed first so they compute with the same torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work"
FINE_TUNES = ("math", "coder", "instruct", "chat", "tools")  # make_checkpoints.MODELS, base excluded
METHODS = ("simple_average", "task_arithmetic", "ties")
BLOCK = 16 * 2**20

# The floor: a warm read of the inputs plus a buffered write of the output size, in a child like hubmerge.
FLOOR = """
import os, sys
out, size, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
buf = bytearray(16 * 2**20)
view = memoryview(buf)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
with open(out, "wb") as f:
    while size > 0:
        size -= f.write(view[: min(size, len(buf))])
os.unlink(out)
"""


@dataclass(frozen=True)
class Run:
    tool: str
    wall_s: float
    peak_rss_gb: float
    load_1m: float
    rc: int
    cpu_s: float  # user + system time of the child: the work done, much less sensitive to load than wall


def warm(paths: list[Path]) -> None:
    buf = bytearray(BLOCK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def measure(tool: str, command: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> Run:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "ab") as out:
        child = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        print(f"  {tool} failed (rc {child.returncode}); see {log}", flush=True)
    return Run(tool, wall, usage.ru_maxrss / 2**20, load, child.returncode, usage.ru_utime + usage.ru_stime)


def make_models(shape: str, count: int) -> Path:
    folder = WORK / f"models-{shape}"
    names = ",".join(("base", *FINE_TUNES[:count]))
    subprocess.run(
        [
            sys.executable,
            str(HERE / "make_checkpoints.py"),
            "--shape",
            shape,
            "--out",
            str(folder),
            "--only",
            names,
        ],
        check=True,
    )
    return folder


# The parameters of each method's row, in hubmerge's recipe and in mergekit's config (same math).
PARAMETERS = {
    "task_arithmetic": ("scaling_factor = 0.8", {"lambda": 0.8, "normalize": "false"}),
    "ties": (
        'scaling_factor = 0.8\nthreshold = 20\nmerge_func = "sum"',
        {"lambda": 0.8, "normalize": "false"},
    ),
    "dare_ties": ("density = 0.5\nlambda = 1.0\nseed = 0", {"density": 0.5, "lambda": 1.0}),
    "slerp": ("t = 0.5", {"t": 0.5}),
    "model_stock": ("", {}),
}


def fine_tunes(method: str, count: int) -> tuple[str, ...]:
    return FINE_TUNES[:1] if method == "slerp" else FINE_TUNES[:count]  # slerp: the base and one model


def hubmerge_recipe(method: str, shape: str, count: int) -> str:
    models = ", ".join(f'"../models-{shape}/{m}"' for m in fine_tunes(method, count))
    text = f'method = "{method}"\n'
    if method != "simple_average":
        text += f'base = "../models-{shape}/base"\n'
    text += f'models = [{models}]\ndtype = "bfloat16"\n'
    if PARAMETERS.get(method, ("",))[0]:
        text += f"\n[parameters]\n{PARAMETERS[method][0]}\n"
    return text


def mergekit_config(method: str, shape: str, count: int) -> str:
    # Equal-weight linear is simple_average; mergekit's ties trims per tensor (hubmerge: whole model).
    name = "linear" if method == "simple_average" else method
    lines = [f"merge_method: {name}"]
    if method != "simple_average":
        lines.append(f"base_model: ../models-{shape}/base")
    lines.append("models:")
    if method == "slerp":  # mergekit's slerp lists the base among its two models
        lines.append(f"  - model: ../models-{shape}/base")
    for m in fine_tunes(method, count):
        params = "{weight: 1.0, density: 0.2}" if method == "ties" else "{weight: 1.0}"
        lines += [f"  - model: ../models-{shape}/{m}"]
        if method not in ("slerp", "model_stock"):
            lines.append(f"    parameters: {params}")
    shared = PARAMETERS.get(method, ("", {}))[1]
    if shared:
        lines += ["parameters:", *(f"  {k}: {v}" for k, v in shared.items())]
    lines += ["dtype: float32", "out_dtype: bfloat16", ""]
    return "\n".join(lines)


def venv(name: str, packages: list[str]) -> Path:
    """A virtual environment under bench/work/ with torch==2.13.0 installed before `packages`."""
    folder = WORK / f"venv-{name}"
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return folder


def version_of(python: Path, *packages: str) -> str:
    code = "from importlib.metadata import version as v\n" + "".join(
        f"print('{p}', v('{p}'))\n" for p in packages
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return result.stdout.strip().replace("\n", ", ") or result.stderr.strip().splitlines()[-1]


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "hubmerge"], capture_output=True, text=True
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{os.cpu_count()} × {cpu}",
        "memory": f"{int(mem) / 2**20:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": version_of(Path(sys.executable), "torch", "safetensors", "hubmerge"),
        "hubmerge commit": git.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else ""),
    }


def fmt(runs: list[Run]) -> tuple[float, float, float]:
    ok = [r for r in runs if r.rc == 0] or runs
    return (
        statistics.median(r.wall_s for r in ok),
        max(r.peak_rss_gb for r in ok),
        statistics.median(r.load_1m for r in ok),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="0.5b", help="comma-separated: 0.5b, 1.5b")
    p.add_argument("--models", default="3", help="comma-separated numbers of fine-tunes (at most 5)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--with-mergekit", action="store_true", help="also run mergekit 0.1.5 (once per cell)")
    p.add_argument(
        "--with-fusionbench",
        action="store_true",
        help="install fusion-bench in its own venv (installed and versioned only: no FusionBench run yet)",
    )
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the other cells of the previous run (bench/work/rows.json)",
    )
    args = p.parse_args(argv)

    configs, out = WORK / "configs", WORK / "out"
    configs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = WORK / "run.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    mergekit = venv("mergekit", ["mergekit==0.1.5"]) / "bin" / "mergekit-yaml" if args.with_mergekit else None
    fusionbench = venv("fusionbench", ["fusion-bench"]) / "bin" / "python" if args.with_fusionbench else None

    rows: list[dict[str, object]] = []
    with open(WORK / "results.jsonl", "a") as record:
        for shape in args.shape.split(","):
            for count in map(int, args.models.split(",")):
                models = make_models(shape, count)
                for method in args.methods.split(","):
                    name = f"{method}-{shape}-{count}"
                    recipe = configs / f"{name}.toml"
                    recipe.write_text(hubmerge_recipe(method, shape, count))
                    needed = ([] if method == "simple_average" else ["base"]) + list(
                        fine_tunes(method, count)
                    )
                    inputs = [models / m / "model.safetensors" for m in needed]
                    size = inputs[0].stat().st_size  # the output has the inputs' layout and dtype
                    target = out / name
                    runs: dict[str, list[Run]] = {"floor": [], "hubmerge": [], "mergekit": []}
                    print(
                        f"== {name}: {len(inputs)} inputs, {sum(i.stat().st_size for i in inputs) / 1e9:.2f} GB",
                        flush=True,
                    )
                    for i in range(args.repeats):
                        warm(inputs)
                        floor = [
                            sys.executable,
                            "-c",
                            FLOOR,
                            str(out / "floor.bin"),
                            str(size),
                            *map(str, inputs),
                        ]
                        runs["floor"].append(measure("floor", floor, ROOT, log))
                        shutil.rmtree(target, ignore_errors=True)
                        warm(inputs)
                        command = [
                            sys.executable,
                            "-m",
                            "hubmerge.cli",
                            str(recipe),
                            "--output",
                            str(target),
                            "-q",
                            # The merge alone, as the floor and mergekit measure it: the diagnostics
                            # (stats) and the sanity check (which loads every model in transformers) are
                            # extra work a user can switch off with these same flags.
                            "--no-stats",
                            "--no-sanity",
                        ]
                        runs["hubmerge"].append(measure("hubmerge", command, ROOT, log, env))
                        if mergekit is not None and i == 0:
                            (configs / f"{name}.yml").write_text(mergekit_config(method, shape, count))
                            shutil.rmtree(out / f"mergekit-{name}", ignore_errors=True)
                            warm(inputs)
                            mk = [str(mergekit), f"{name}.yml", str(out / f"mergekit-{name}")]
                            runs["mergekit"].append(measure("mergekit", mk, configs, log, env))
                        for tool in runs:
                            if runs[tool] and len(runs[tool]) == i + 1:
                                r = runs[tool][-1]
                                print(
                                    f"  {tool:9} {r.wall_s:7.1f} s  {r.peak_rss_gb:5.2f} GB  load {r.load_1m:.2f}",
                                    flush=True,
                                )
                                record.write(json.dumps({"cell": name, "repeat": i, **r.__dict__}) + "\n")
                    comparison = None
                    if runs["mergekit"]:
                        check = subprocess.run(
                            [
                                sys.executable,
                                str(HERE / "compare.py"),
                                str(target),
                                str(out / f"mergekit-{name}"),
                            ],
                            capture_output=True,
                            text=True,
                        )
                        comparison = check.stdout.strip()
                        shutil.rmtree(out / f"mergekit-{name}", ignore_errors=True)
                    shutil.rmtree(target, ignore_errors=True)
                    floor_s, _, _ = fmt(runs["floor"])
                    hub_s, hub_rss, load = fmt(runs["hubmerge"])
                    rows.append(
                        {
                            "shape": shape,
                            "models": count,
                            "method": method,
                            "input_gb": sum(i.stat().st_size for i in inputs) / 1e9,
                            "floor_s": floor_s,
                            "hubmerge_s": hub_s,
                            "ratio": hub_s / floor_s,
                            "rss_gb": hub_rss,
                            "load": load,
                            "walls": [round(r.wall_s, 1) for r in runs["hubmerge"]],
                            "cpu_s": statistics.median(r.cpu_s for r in runs["hubmerge"]),
                            "floor_cpu_s": statistics.median(r.cpu_s for r in runs["floor"]),
                            "floors": [round(r.wall_s, 1) for r in runs["floor"]],
                            "mergekit": fmt(runs["mergekit"]) if runs["mergekit"] else None,
                            "comparison": comparison,
                        }
                    )
    saved = WORK / "rows.json"
    if args.append and saved.exists():
        key = lambda r: (r["shape"], r["models"], r["method"])  # noqa: E731
        fresh = {key(r) for r in rows}
        rows = [r for r in json.loads(saved.read_text()) if key(r) not in fresh] + rows
    saved.write_text(json.dumps(rows))
    info = machine()
    if mergekit is not None:
        info["mergekit venv"] = version_of(mergekit.parent / "python", "torch", "mergekit", "transformers")
    if fusionbench is not None:
        info["fusion-bench venv"] = version_of(fusionbench, "torch", "fusion-bench")
    write_results(args, rows, info)
    print(f"wrote {args.results}")
    return 0


TARGETS = {"simple_average": 1.5, "linear": 1.5, "task_arithmetic": 1.5, "ties": 3.5}


def _target(ratio: float, target: float | None) -> str:
    return "" if target is None else f" ({'≤' if ratio <= target else '>'} {target})"


def write_results(args: argparse.Namespace, rows: list[dict[str, object]], info: dict[str, str]) -> None:
    command = "python bench/run.py " + " ".join(a for a in sys.argv[1:])
    lines = [
        "# Benchmark: hubmerge against the I/O floor of the same run",
        "",
        f"Generated by `{command.strip()}` (see the docstring of bench/run.py for the method);",
        "with `--append`, cells of earlier invocations are kept (each row says how many runs it has).",
        f"Medians of {args.repeats} alternating runs per cell (floor, hubmerge, floor, hubmerge, ...), page cache",
        "warmed before every run. **floor**: a child process reading exactly the input files the method needs",
        "and writing a buffered file of the output's size. **ratio** = hubmerge / floor. Peak RSS is the",
        "largest `ru_maxrss` of the hubmerge child over the repeats. load = median 1-minute load average",
        "before the runs (2-core machine shared with other engineers' test runs). CPU s: median user + system",
        "seconds of the child (the work done, far less sensitive to the load than wall time).",
        "",
        "| shape | fine-tunes | method | inputs GB | floor s | hubmerge s | ratio (target) | peak RSS GB "
        "| load | CPU s hubmerge / floor | runs s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = TARGETS.get(str(r["method"]))  # the targets cover the linear methods and TIES
        ratio = float(r["ratio"])  # type: ignore[arg-type]
        cpu = f"{r['cpu_s']:.1f} / {r['floor_cpu_s']:.1f}" if "cpu_s" in r else "not recorded"
        lines.append(
            f"| {r['shape']} | {r['models']} | {r['method']} | {r['input_gb']:.2f} | {r['floor_s']:.1f} | "
            f"{r['hubmerge_s']:.1f} | {ratio:.2f}×{_target(ratio, target)} | "
            f"{r['rss_gb']:.2f} | {r['load']:.2f} | {cpu} | {r['walls']} (floor {r['floors']}) |"
        )
    mk = [r for r in rows if r["mergekit"]]
    if mk:
        lines += ["", "mergekit 0.1.5 (one run per cell, same warm cache):", ""]
        for r in mk:
            wall, rss, load = r["mergekit"]  # type: ignore[misc]
            lines.append(
                f"- {r['method']} {r['shape']} × {r['models']}: {wall:.1f} s, {rss:.2f} GB (load {load:.2f}); output vs hubmerge: `{r['comparison']}`"
            )
    lines += ["", "Machine and versions:", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    # Hand-written analysis (profiles, what blocks a target) lives under "## Notes" and survives reruns.
    old = args.results.read_text() if args.results.exists() else ""
    notes = old[old.index("## Notes") :] if "## Notes" in old else ""
    args.results.write_text("\n".join(lines) + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    sys.exit(main())
