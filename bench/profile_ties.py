"""Where hubmerge's TIES time goes: phase timers plus a cProfile of `hubmerge.merge`.

Wraps (at run time, without editing hubmerge/) the engine's threshold phase, the sample that brackets
the cut-off (`engine._sample`), each streaming pass of the selection (`engine._streamed` chunks: pass 1
= the bracketed count; passes 2-3 only if a bracket missed), `TensorReader.read` (pread of the slices),
`methods.ties` and `ShardWriter.write`, then prints a phase table and the top functions by own time.

    python bench/run.py --methods ties --repeats 1     # writes bench/work/configs/ties-0.5b-3.toml
    python bench/profile_ties.py [RECIPE] [--output DIR] [--no-cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent

timers: dict[str, float] = defaultdict(float)
TIES_STATS: dict[str, int] = {}
PHASES = ("thresholds (sample + selection passes, total)", "write_weights (whole engine)")
counts: dict[str, int] = defaultdict(int)


def memory() -> str:
    """Current and peak resident memory of this process, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    rss, hwm = (int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))
    return f"RSS {rss:.2f} GB, peak {hwm:.2f} GB"


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[name] += time.perf_counter() - start
            counts[name] += 1
            if name in PHASES:
                print(f"after {name}: {memory()}", flush=True)

    return wrapper


def install() -> None:
    from hubmerge import checkpoint, engine, selection

    engine._ties_thresholds = timed("thresholds (sample + selection passes, total)", engine._ties_thresholds)
    engine.write_weights = timed("write_weights (whole engine)", engine.write_weights)
    checkpoint.TensorReader.read = timed("TensorReader.read (pread)", checkpoint.TensorReader.read)
    checkpoint.ShardWriter.write = timed("ShardWriter.write", checkpoint.ShardWriter.write)

    original_method = engine._Patches.apply

    def apply_method(self, plan, files):
        print(f"before patches: {memory()}", flush=True)
        print(f"patches: sign_sum={self.sign_sum}, {self.count:,} positions spilled", flush=True)
        return original_method(self, plan, files)

    engine._Patches.apply = timed("patches: apply", apply_method)
    engine._Patches.add = timed("patches: add (spill)", engine._Patches.add)

    original_ties = engine.ties
    stats = {"undecided": 0, "sign_sum": 0}

    def ties_counted(*args, **kwargs):
        chunk = original_ties(*args, **kwargs)
        stats["undecided"] += int(chunk.undecided.numel())
        stats["sign_sum"] += chunk.sign_sum
        stats["chunks"] = stats.get("chunks", 0) + 1
        if stats["chunks"] % 1000 == 0:
            print(
                f"merge chunk {stats['chunks']}: {stats['undecided']:,} undecided so far, {memory()}",
                flush=True,
            )
        return chunk

    engine.ties = ties_counted
    global TIES_STATS
    TIES_STATS = stats

    engine._sample = timed("sample (bracket the cut-off)", engine._sample)
    original_streamed = engine._streamed

    def streamed(inputs, tensors):
        chunks = original_streamed(inputs, tensors)
        calls = {"n": 0}

        def timed_chunks():
            calls["n"] += 1
            label = f"selection pass {calls['n']}"
            start = time.perf_counter()
            produce = 0.0
            it = chunks()
            while True:
                t = time.perf_counter()
                try:
                    chunk = next(it)
                except StopIteration:
                    break
                produce += time.perf_counter() - t
                yield chunk
            timers[label + " (total)"] += time.perf_counter() - start
            timers[label + ": read + |τ|"] += produce
            print(f"after {label}: {memory()}", flush=True)

        return timed_chunks

    engine._streamed = streamed
    engine.ties = timed("methods.ties (merge math)", engine.ties)
    # kth_smallest reads `chunks` from its argument, so nothing else to patch there.
    del selection


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe", nargs="?", type=Path, default=HERE / "work" / "configs" / "ties-0.5b-3.toml")
    p.add_argument("--output", type=Path, default=HERE / "work" / "out" / "profile-ties")
    p.add_argument("--no-cprofile", action="store_true")
    p.add_argument("--chunk-elements", type=int, help="override hubmerge.plan.CHUNK_ELEMENTS for this run")
    p.add_argument("--stats", type=Path, default=HERE / "work" / "ties.pstats")
    args = p.parse_args(argv)
    install()
    if args.chunk_elements:
        from hubmerge import plan

        plan.CHUNK_ELEMENTS = args.chunk_elements
        print(f"CHUNK_ELEMENTS = {args.chunk_elements}", flush=True)
    import hubmerge

    start = time.perf_counter()
    if args.no_cprofile:
        hubmerge.merge(args.recipe, output_dir=args.output, push=False, quiet=True)
    else:
        prof = cProfile.Profile()
        prof.enable()
        hubmerge.merge(args.recipe, output_dir=args.output, push=False, quiet=True)
        prof.disable()
        prof.dump_stats(args.stats)
    total = time.perf_counter() - start
    print(f"hubmerge.merge: {total:.1f} s wall (profiled)")
    for name in sorted(timers):
        print(
            f"  {timers[name]:8.1f} s  {100 * timers[name] / total:5.1f} %  {name}  ({counts.get(name, '')} calls)"
        )
    print(
        f"ties chunks: {TIES_STATS}  (undecided = positions whose elected sign is 0 but some trimmed τ is not)"
    )
    if not args.no_cprofile:
        s = io.StringIO()
        stats = pstats.Stats(str(args.stats), stream=s)
        stats.sort_stats("tottime").print_stats(30)
        print(s.getvalue())
    shutil.rmtree(args.output, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
