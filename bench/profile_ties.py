"""Where hubmerge's TIES time goes: phase timers plus a cProfile of `hubmerge.merge`.

Wraps (at run time, without editing hubmerge/) the engine's threshold phase, each streaming pass of
the selection (`engine._magnitudes` chunks: pass 1 = coarse histograms, pass 2 = fine histograms),
`TensorReader.read` (pread of the bf16 slices), `methods.ties` and `ShardWriter.write`, then prints a
phase table and the top functions by own time, grouped into categories.

    /work/venv/bin/python bench/profile_ties.py [RECIPE] [--output DIR] [--no-cprofile]
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
counts: dict[str, int] = defaultdict(int)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[name] += time.perf_counter() - start
            counts[name] += 1

    return wrapper


def install() -> None:
    from hubmerge import checkpoint, engine, selection

    engine._ties_thresholds = timed("thresholds (both selection passes, total)", engine._ties_thresholds)
    engine.ties = timed("methods.ties (merge math)", engine.ties)
    engine.write_weights = timed("write_weights (whole engine)", engine.write_weights)
    checkpoint.TensorReader.read = timed("TensorReader.read (pread)", checkpoint.TensorReader.read)
    checkpoint.ShardWriter.write = timed("ShardWriter.write", checkpoint.ShardWriter.write)

    original_magnitudes = engine._magnitudes

    def magnitudes(inputs, tensors):
        chunks = original_magnitudes(inputs, tensors)
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
            timers[label + ": read + upcast + |τ| stack"] += produce

        return timed_chunks

    engine._magnitudes = magnitudes
    # kth_smallest reads `chunks` from its argument, so nothing else to patch there.
    del selection


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe", nargs="?", type=Path, default=HERE / "configs" / "hubmerge-ties.toml")
    p.add_argument("--output", type=Path, default=HERE / "work" / "out" / "profile-ties")
    p.add_argument("--no-cprofile", action="store_true")
    p.add_argument("--stats", type=Path, default=HERE / "work" / "ties.pstats")
    args = p.parse_args(argv)
    install()
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
        print(f"  {timers[name]:8.1f} s  {100 * timers[name] / total:5.1f} %  {name}  ({counts.get(name, '')} calls)")
    if not args.no_cprofile:
        s = io.StringIO()
        stats = pstats.Stats(str(args.stats), stream=s)
        stats.sort_stats("tottime").print_stats(30)
        print(s.getvalue())
    shutil.rmtree(args.output, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
