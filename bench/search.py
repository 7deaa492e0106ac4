"""Trials per hour of `hubmerge search`: one trial at a time, side by side, and on a two-node Ray cluster.

A task_arithmetic base + 3 recipe (bench/make_checkpoints.py's models, or the tiny demo ones) searched over
`scaling_factor` with the random sampler (seed 0) and the built-in objective (mean loss per token on the
sanity texts). Each mode runs `hubmerge search` in a fresh child process into a fresh folder; peak RSS is the
child's `ru_maxrss` (its trial processes included in side-by-side mode; Ray's workers are not children).
The Ray cluster is two raylets of one CPU each on this machine (`ray.cluster_utils.Cluster`).

    python bench/search.py [--models bench/work/models] [--trials 6] [--modes local,side,ray]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _recipe(models: Path, work: Path, trials: int) -> Path:
    recipe = work / "recipe.toml"
    recipe.write_text(
        f'method = "task_arithmetic"\nbase = "{models / "base"}"\n'
        f'models = ["{models / "math"}", "{models / "coder"}", "{models / "instruct"}"]\n'
        "[parameters]\nscaling_factor = 0.8\n"
        f'[search]\ntrials = {trials}\nsampler = "random"\nseed = 0\n'
        '[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.5 }\n'
    )
    return recipe


def _run(recipe: Path, out: Path, extra: list[str]) -> tuple[float, float, dict[str, object]]:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", "search", str(recipe), "--output", str(out), "-q", *extra],
        check=True,
        cwd=REPO,
    )
    seconds = time.monotonic() - started
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024 / 1e9
    return seconds, peak, json.loads((out / "search_results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=REPO / "recipes" / "examples" / "tiny")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--modes", default="local,side,ray")
    args = p.parse_args(argv)
    work = HERE / "work" / "search"
    work.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(args.models.resolve(), work, args.trials)
    load = os.getloadavg()[0]
    rows = []
    for mode in args.modes.split(","):
        cluster = None
        extra: list[str] = []
        if mode == "side":
            recipe.write_text(recipe.read_text().replace("seed = 0\n", "seed = 0\nconcurrency = 2\n"))
        elif mode == "ray":
            from ray.cluster_utils import Cluster

            node = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
            os.environ["PYTHONPATH"] = str(REPO)
            cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            extra = ["--ray", cluster.address]
        try:
            seconds, peak, results = _run(recipe, work / mode, extra)
        finally:
            if cluster is not None:
                cluster.shutdown()
            recipe.write_text(recipe.read_text().replace("concurrency = 2\n", ""))
        trials = results["trials"]
        assert isinstance(trials, list)
        complete = [t for t in trials if t["state"] == "complete"]
        per_trial = sorted(t["seconds"] for t in complete)
        rows.append(
            f"| {args.models.name} | {mode} | {len(complete)}/{len(trials)} | {seconds:.1f} | "
            f"{3600 * len(complete) / seconds:.0f} | {per_trial[len(per_trial) // 2]:.1f} | {peak:.2f} | "
            f"{results['best']['score']:.5f} |"  # type: ignore[index]
        )
    print(f"load before: {load:.2f}")
    print("| models | mode | complete | wall s | trials/hour | median trial s | peak RSS GB | best score |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
