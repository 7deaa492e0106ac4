"""The sanity check's cost next to the merge's: wall time, CPU time and peak RSS, each in its own child process.

On base + 3 fine-tunes of a bench shape (`make_checkpoints.py`; 1.5B by default) with task_arithmetic:
  1. the merge alone (`hubmerge RECIPE --no-stats --no-sanity`), which writes the output folder;
  2. the sanity check alone on that output (`sanity.check`: the merge and each of the 4 sources, layer by
     layer), in a child that only imports hubmerge, so its peak RSS is the check's;
  3. with `--default`, the command a user runs (`hubmerge RECIPE`: diagnostics and the sanity check on).
The page cache is warmed (inputs and output) before each run. The check's child also prints the tokens it
predicts and the float32 multiply-adds of its forward passes, from which the achieved GFLOP/s follows.

    python bench/sanity.py [--shape 1.5b] [--models DIR] [--repeats 1] [--default]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from run import FINE_TUNES, ROOT, WORK, make_models, measure, warm

CHECK = """
import json, sys, time
from pathlib import Path
from hubmerge.quality.forward import Checkpoint, Qwen2Shape
from hubmerge.quality.sanity import _tokenize, check, sanity_texts
facts, out, sources = Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
start = time.perf_counter()
report = check(out, [Checkpoint.local(p.name, p) for p in sources])
seconds = time.perf_counter() - start
ids = _tokenize(out, sanity_texts())
tokens = sum(len(s) for domain in ids.values() for s in domain)
predicted = sum(len(s) - 1 for domain in ids.values() for s in domain)
shape = Qwen2Shape.from_config(json.loads((out / "config.json").read_text()))
h, q, kv = shape.hidden_size, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
layer = h * (2 * q + 2 * kv) + 3 * h * shape.intermediate_size
flop = 2 * (tokens * shape.layers * layer + predicted * shape.vocab_size * h) * (1 + len(sources))
facts.write_text(json.dumps({"summary": report.summary(), "seconds": seconds, "tokens": tokens,
                             "predicted": predicted, "gflop": flop / 1e9, "gflop_per_s": flop / 1e9 / seconds}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--models", type=Path, help="a folder with base, math, coder, instruct (default: made)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--default", action="store_true", help="also run the default command (stats and sanity on)"
    )
    args = p.parse_args(argv)
    models = args.models or make_models(args.shape, 3)
    names = ("base", *FINE_TUNES[:3])
    configs = WORK / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    out = WORK / "out" / f"sanity-{args.shape}"
    recipe = configs / f"sanity-{args.shape}.toml"
    recipe.write_text(
        f'method = "task_arithmetic"\nbase = "{models / "base"}"\n'
        f"models = [{', '.join(repr(str(models / n)).replace(chr(39), chr(34)) for n in names[1:])}]\n"
        'dtype = "bfloat16"\n\n[parameters]\nscaling_factor = 0.8\n'
    )
    inputs = [models / n / "model.safetensors" for n in names]
    log = WORK / f"sanity-{args.shape}.log"
    hubmerge = [sys.executable, "-m", "hubmerge.cli", str(recipe), "--output", str(out), "-q"]
    rows = []
    for _ in range(args.repeats):
        warm(inputs)
        merge = measure("merge alone", [*hubmerge, "--no-stats", "--no-sanity"], ROOT, log)
        warm([*inputs, *out.glob("*.safetensors")])
        facts = WORK / f"sanity-{args.shape}-facts.json"
        command = [sys.executable, "-c", CHECK, str(facts), str(out), *(str(models / n) for n in names)]
        check = measure("sanity check alone", command, ROOT, log)
        row = {"merge": merge.__dict__, "check": check.__dict__, "facts": json.loads(facts.read_text())}
        if args.default:
            warm(inputs)
            row["default"] = measure("default command", hubmerge, ROOT, log).__dict__
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
