"""GGUF export benchmark: wall time and peak RSS of `hubmerge gguf` on a Qwen2.5-shaped folder.

    python bench/gguf.py [--shape 0.1b|0.5b|1.5b] [--types q8_0,q4_k_m]

Makes the base checkpoint of that shape with bench/make_checkpoints.py when it is missing (bench/work/models),
then writes each GGUF type in a fresh process (`python -m hubmerge.cli gguf`), timing it and reading that
process's peak resident memory. The files go to bench/work/gguf and are kept for inspection. llama.cpp's
convert_hf_to_gguf.py + llama-quantize are not run here (building llama.cpp takes ~30 min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_CHILD = """
import resource, sys, time
from pathlib import Path
from hubmerge.gguf.writer import write_gguf
start = time.perf_counter()
written = write_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, written.size,
      written.bits_per_weight)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", choices=("0.1b", "0.5b", "1.5b"))
    p.add_argument("--types", default="q8_0,q4_k_m")
    p.add_argument("--work", type=Path, default=HERE / "work")
    args = p.parse_args(argv)
    models = args.work / "models" / args.shape
    if not (models / "base" / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, str(HERE / "make_checkpoints.py"), "--shape", args.shape, "--out", str(models),
             "--only", "base"],
            check=True,
        )  # fmt: skip
    out = args.work / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for gguf_type in args.types.split(","):
        path = out / f"{args.shape}-{gguf_type.upper()}.gguf"
        path.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(models / "base"), str(path), gguf_type],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        seconds, rss, size, bpw = done.stdout.split()
        row = {
            "shape": args.shape,
            "type": gguf_type,
            "wall_s": round(float(seconds), 1),
            "peak_rss_gb": round(int(rss) / 1e9, 2),
            "file_gb": round(int(size) / 1e9, 3),
            "bits_per_weight": round(float(bpw), 2),
            "cores": len(os.sched_getaffinity(0)),
        }
        results.append(row)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
