"""Streamed sources against the cache (issue 8): a Qwen2.5-shaped base + 3 served by the local test Hub.

For each method it runs the same recipe twice, each time with an empty Hugging Face cache:
  * **cached**: disk to spare, so every source is downloaded whole into the cache, then merged;
  * **streaming**: `--max-disk` holds the output and the metadata but not one source, so every source is read
    by HTTP range (`remote.py`) and nothing of it is written to disk; every byte read is proven against the
    Hub's sha256, which reads what did not arrive in file order once more (the default);
  * **unverified**: the same with `[output] verify_streamed = false` (sizes and headers only): what the proof
    costs is the difference between these two rows.
The Hub is tests/support/hubserver/ in this process, serving the checkpoints of `make_checkpoints.py` from disk
(`hubserver.DiskFile`, real sha256), so the sources cost no memory here. Measured per run: wall time, the
child's peak RSS (`os.wait4`), peak disk (bytes under the run's folder: HF_HOME, output and staging, polled
every 20 ms) and
the weight bytes the Hub served; the plan's own estimates (`plan --json`) are printed beside them, and the
two outputs are compared byte for byte.

    python bench/streaming.py --shape 1.5b     # prints a Markdown table (paste it into RESULTS.md)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from run import WORK, make_models, measure  # noqa: E402
from support.hubserver import DiskFile, LocalHub  # noqa: E402

TOKEN = "hf_bench_token"
FINE_TUNES = ("math", "coder", "instruct")
PARAMETERS = {
    "simple_average": "",
    "task_arithmetic": "[parameters]\nscaling_factor = 0.8\n",
    "ties": "[parameters]\nscaling_factor = 0.8\nthreshold = 20\n",
}


def _serve(hub: LocalHub, models: Path) -> None:
    for name in ("base", *FINE_TUNES):
        repo = f"Qwen/bench-{name}"
        hub.create_repo(repo)
        files = {
            p.name: DiskFile(p) if p.suffix == ".safetensors" else p.read_bytes()
            for p in sorted((models / name).iterdir())
            if p.is_file()
        }
        hub.commit(repo, files, "Upload model")


def _recipe(method: str, verify: bool = True) -> str:
    base = "" if method == "simple_average" else 'base = "Qwen/bench-base"\n'
    models = ", ".join(f'"Qwen/bench-{m}"' for m in FINE_TUNES)
    output = "" if verify else "[output]\nverify_streamed = false\n"
    return f'method = "{method}"\n{base}models = [{models}]\ndtype = "bfloat16"\n{PARAMETERS[method]}{output}'


def _used(paths: list[Path]) -> int:
    total = 0
    for root in paths:
        for folder, _, files in os.walk(root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


class _Watcher:
    """The most bytes under `paths` while a run lasts."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.peak = paths, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _used(self.paths))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _used(self.paths))


def _sha256(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        out[p.name] = digest.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", help="0.5b or 1.5b")
    p.add_argument("--methods", default=",".join(PARAMETERS))
    args = p.parse_args(argv)
    models = make_models(args.shape, len(FINE_TUNES))
    source = (models / "base" / "model.safetensors").stat().st_size
    # Room for the output (about one source) and the metadata, not for a source more.
    budget = source + source // 4
    scratch = WORK / "streaming"
    log = scratch / "runs.log"
    rows = []
    with LocalHub() as hub:
        hub.add_user("user", TOKEN)
        _serve(hub, models)
        for method in args.methods.split(","):
            outputs = {}
            for mode in ("cached", "streaming", "unverified"):
                run = scratch / f"{method}-{mode}"
                shutil.rmtree(run, ignore_errors=True)
                run.mkdir(parents=True)
                recipe = run / "recipe.toml"
                recipe.write_text(_recipe(method, verify=mode != "unverified"))
                env = {
                    **os.environ,
                    "HF_ENDPOINT": hub.url,
                    "HF_HOME": str(run / "hf_home"),
                    "HF_TOKEN": TOKEN,
                    "HF_HUB_DISABLE_XET": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1",
                    "NO_PROXY": "127.0.0.1,localhost",
                    "PYTHONPATH": str(ROOT),
                }
                extra = ["--max-disk", str(budget)] if mode != "cached" else []
                out = run / "out"
                planned = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "hubmerge.cli",
                        "plan",
                        str(recipe),
                        "--json",
                        "--output",
                        str(out),
                        *extra,
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                disk = json.loads(planned.stdout)["disk"]
                shutil.rmtree(run / "hf_home")  # the plan's metadata: the run starts from an empty cache
                command = [sys.executable, "-m", "hubmerge.cli", str(recipe), "--output", str(out), "-q"]
                command += ["--no-stats", "--no-sanity", *extra]
                since = len(hub.requests)
                watcher = _Watcher([run])  # the cache, the output and its staging folder
                result = measure(f"{method} {mode}", command, run, log, env)
                peak = watcher.stop()
                served = hub.bytes_served(lambda path: path.endswith(".safetensors"), since=since)
                requests = sum(1 for r in hub.requests[since:] if r.path.endswith(".safetensors"))
                if result.rc:
                    print(f"{method} {mode}: failed, see {log}", file=sys.stderr)
                    return 1
                outputs[mode] = _sha256(out)
                rows.append(
                    f"| {method} | {mode} | {disk['strategy']} | {result.wall_s:.0f} | {result.cpu_s:.0f} | "
                    f"{result.peak_rss_gb:.2f} | {peak / 1e9:.2f} ({disk['peak_disk_bytes'] / 1e9:.2f}) | "
                    f"{served / 1e9:.2f} ({disk['network_bytes'] / 1e9:.2f}) | {requests} |"
                )
                print(rows[-1], flush=True)
                shutil.rmtree(run / "hf_home")
            same = outputs["cached"] == outputs["streaming"] == outputs["unverified"]
            rows.append(
                f"| {method} | outputs | {'byte for byte the same' if same else 'DIFFERENT'} | | | | | | |"
            )
            print(rows[-1], flush=True)
            if not same:
                return 1
    print(
        f"\nbudget for streaming: --max-disk {budget} ({budget / 1e9:.2f} GB); one source {source / 1e9:.2f} GB"
    )
    print(
        "| method | mode | plan | wall s | CPU s | peak RSS GB | peak disk GB (plan) | weight bytes served GB (plan) "
        "| weight requests |"
    )
    print("|---|---|---|---:|---:|---:|---|---|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
