"""Where hubmerge's TIES time goes: phase timers plus a cProfile of `hubmerge.merge`.

Wraps (at run time, without editing hubmerge/) the model-scope passes before the merge
(`engine._Passes.before_merge`: the sample that brackets each cut-off, `_Passes._sample`, and the
streaming passes of the selection, `engine.kth_smallest`'s calls of its `chunks`: pass 1 = the bracketed
count; passes 2-3 only if a bracket missed), `TensorReader.read` (pread of the slices), the TIES merge
step (`ties.METHOD.merge`), the diagnostics (`MergeStats.measure`), the majority-sign patches and
`ShardWriter.write`, then prints a phase table and the top functions by own time. The merge step and the
diagnostics run on the merge threads: their times are summed over the threads (they can exceed the wall
time). The sanity check is off: it is not TIES's time.

    python bench/run.py --methods ties --repeats 1     # writes bench/work/configs/ties-0.5b-3.toml
    python bench/profile_ties.py [RECIPE] [--output DIR] [--no-cprofile] [--no-stats]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This checkout's hubmerge, whatever is installed (bench/run.py runs it the same way, with PYTHONPATH).
sys.path.insert(0, str(HERE.parent))

timers: dict[str, float] = defaultdict(float)
counts: dict[str, int] = defaultdict(int)
TIES_STATS: dict[str, int] = defaultdict(int)
PHASES = ("model-scope passes (samples + selection passes, total)", "write_weights (whole engine)")
_lock = threading.Lock()  # timers are updated from the merge threads too


def memory() -> str:
    """Current and peak resident memory of this process, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    rss, hwm = (int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))
    return f"RSS {rss:.2f} GB, peak {hwm:.2f} GB"


def add(name: str, seconds: float) -> None:
    with _lock:
        timers[name] += seconds
        counts[name] += 1


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            add(name, time.perf_counter() - start)
            if name in PHASES:
                print(f"after {name}: {memory()}", flush=True)

    return wrapper


def install() -> None:
    from hubmerge import api
    from hubmerge.merging import engine
    from hubmerge.merging.methods import Deferred, ties
    from hubmerge.quality import diagnostics
    from hubmerge.sources import checkpoint

    engine._Passes.before_merge = timed(PHASES[0], engine._Passes.before_merge)
    engine._Passes._sample = timed("sample (bracket the cut-off)", engine._Passes._sample)
    api.write_weights = timed(PHASES[1], api.write_weights)  # the api calls the name it imported
    checkpoint.TensorReader.read = timed("TensorReader.read (pread)", checkpoint.TensorReader.read)
    checkpoint.ShardWriter.write = timed("ShardWriter.write", checkpoint.ShardWriter.write)
    diagnostics.MergeStats.measure = timed(
        "diagnostics: MergeStats.measure (summed over the merge threads)", diagnostics.MergeStats.measure
    )

    original_apply = engine._Patches.apply

    def apply(self, plan, files):
        print(f"before patches: {memory()}", flush=True)
        print(f"patches: tally={self.tally}, {self.count:,} positions spilled", flush=True)
        return original_apply(self, plan, files)

    engine._Patches.apply = timed("patches: apply", apply)
    engine._Patches.add = timed("patches: add (spill)", engine._Patches.add)

    original_merge = ties.METHOD.merge

    def merge(s, stats):
        start = time.perf_counter()
        result = original_merge(s, stats)
        add("methods.ties merge step (summed over the merge threads)", time.perf_counter() - start)
        with _lock:
            TIES_STATS["pieces"] += 1
            if isinstance(result, Deferred):
                TIES_STATS["undecided"] += int(result.positions.numel())
                TIES_STATS["sign_sum"] += result.tally
            if TIES_STATS["pieces"] % 1000 == 0:
                print(f"merge piece {TIES_STATS['pieces']}: {dict(TIES_STATS)}, {memory()}", flush=True)
        return result

    object.__setattr__(ties.METHOD, "merge", merge)  # a frozen registry entry: the engine calls this field

    original_kth = engine.kth_smallest

    def kth_smallest(chunks, ranks, brackets):
        calls = {"n": 0}

        def timed_chunks():
            calls["n"] += 1
            label = f"selection pass {calls['n']}"
            start = time.perf_counter()
            produce = 0.0
            it = iter(chunks())
            while True:
                t = time.perf_counter()
                try:
                    chunk = next(it)
                except StopIteration:
                    break
                produce += time.perf_counter() - t
                yield chunk
            add(label + " (total)", time.perf_counter() - start)
            add(label + ": read + |τ|", produce)
            print(f"after {label}: {memory()}", flush=True)

        return original_kth(timed_chunks, ranks, brackets)

    engine.kth_smallest = kth_smallest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe", nargs="?", type=Path, default=HERE / "work" / "configs" / "ties-0.5b-3.toml")
    p.add_argument("--output", type=Path, default=HERE / "work" / "out" / "profile-ties")
    p.add_argument("--no-cprofile", action="store_true")
    p.add_argument("--chunk-elements", type=int, help="override hubmerge.merging.plan.CHUNK_ELEMENTS for this run")
    p.add_argument(
        "--pstats", type=Path, default=HERE / "work" / "ties.pstats", help="where the profile goes"
    )
    p.add_argument("--no-stats", action="store_true", help="without the merge diagnostics (as --no-stats)")
    args = p.parse_args(argv)
    install()
    if args.chunk_elements:
        from hubmerge.merging import plan

        plan.CHUNK_ELEMENTS = args.chunk_elements
        print(f"CHUNK_ELEMENTS = {args.chunk_elements}", flush=True)
    import hubmerge

    start = time.perf_counter()
    options = {"output_dir": args.output, "push": False, "quiet": True, "sanity": False}
    if args.no_cprofile:
        hubmerge.merge(args.recipe, stats=not args.no_stats, **options)
    else:
        prof = cProfile.Profile()
        prof.enable()
        hubmerge.merge(args.recipe, stats=not args.no_stats, **options)
        prof.disable()
        prof.dump_stats(args.pstats)
    total = time.perf_counter() - start
    print(f"hubmerge.merge: {total:.1f} s wall (profiled)")
    for name in sorted(timers):
        print(
            f"  {timers[name]:8.1f} s  {100 * timers[name] / total:5.1f} %  {name}  ({counts.get(name, '')} calls)"
        )
    print(
        f"ties pieces: {dict(TIES_STATS)}  (undecided = positions whose elected sign is 0 but some trimmed τ "
        "is not, left to the patches)"
    )
    if not args.no_cprofile:
        s = io.StringIO()
        stats = pstats.Stats(str(args.pstats), stream=s)
        stats.sort_stats("tottime").print_stats(30)
        print(s.getvalue())
    shutil.rmtree(args.output, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
