"""llama.cpp runs hubmerge's GGUF files: greedy tokens of llama-cpp-python next to transformers.

    python bench/gguf_generate.py [--steps 300] [--types f32,f16,q8_0,q4_k_m] [--new 24]

Needs bench/build_llama.sh (llama-cpp-python in bench/work/llama-venv). Trains a small Qwen2 model (2 layers,
hidden 256, the byte-level BPE tokenizer of recipes/examples/tiny) for `--steps` steps on the license texts
in /usr/share/common-licenses, so that its greedy continuations are text, not noise; saves it in bf16 as
transformers does; writes each GGUF type with `hubmerge gguf` (write_gguf); then, for a few prompts,
compares `--new` greedy tokens:

* transformers on the safetensors folder (float32): the reference;
* transformers on each GGUF file (`from_pretrained(folder, gguf_file=...)`, dequantized by the `gguf`
  package): the file's own weights;
* llama-cpp-python on each GGUF file (its tokenizer for the prompt, its logits, argmax at each step).

The trained model is kept in WORK/model and reused by the next run (unless `--retrain`). Prints JSON lines
and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[0] = str(REPO)  # this tree's hubmerge, and the `gguf` package rather than bench/gguf.py
TINY = REPO / "recipes" / "examples" / "tiny" / "base"
LLAMA_PYTHON = HERE / "work" / "llama-venv" / "bin" / "python"
PROMPTS = [
    "The licenses for most software are designed to",
    "Permission is hereby granted, free of charge, to any person",
    "THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND",
    "you may not use this file except",
]

# Runs in the llama-cpp-python venv: argv = files (JSON), prompts (JSON), new tokens; prints JSON.
_LLAMA = """
import json, sys
import numpy as np
from llama_cpp import Llama
files, prompts, new = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
out = {}
for name, path in files.items():
    llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    rows = []
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        tokens = []
        for _ in range(new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            llm.eval([token])
        rows.append({"prompt_ids": ids, "tokens": tokens, "text": llm.detokenize(tokens).decode("utf-8", "replace")})
    out[name] = rows
    del llm
print(json.dumps(out))
"""


def corpus() -> str:
    texts = [
        p.read_text(errors="replace")
        for p in sorted(Path("/usr/share/common-licenses").iterdir())
        if p.is_file()
    ]
    return "\n\n".join(texts)


def train(folder: Path, steps: int, seed: int = 0) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TINY / name).is_file():
            shutil.copyfile(TINY / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer(corpus())["input_ids"])
    config = Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6, tie_word_embeddings=True,
        bos_token_id=480, eos_token_id=480,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    length, batch = 64, 8
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        offsets = torch.randint(0, len(ids) - length - 1, (batch,))
        x = torch.stack([ids[o : o + length] for o in offsets])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.to(torch.bfloat16).save_pretrained(folder)
    return {
        "corpus_tokens": len(ids),
        "steps": steps,
        "loss_first": round(sum(losses[:10]) / 10, 3),
        "loss_last": round(sum(losses[-10:]) / 10, 3),
        "train_s": round(time.perf_counter() - start, 1),
    }


def greedy(
    folder: Path, prompt_ids: list[list[int]], new: int, gguf_file: str | None = None
) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.eval()
    result = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            for _ in range(new):
                token = model(x).logits[0, -1].argmax()
                x = torch.cat([x, token.view(1, 1)], dim=1)
            result.append(x[0, len(ids) :].tolist())
    return result


def agree(a: list[int], b: list[int]) -> int:
    """How many tokens agree before the first difference."""
    n = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--types", default="f32,f16,q8_0,q4_k_m")
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--work", type=Path, default=HERE / "work" / "gguf-generate")
    p.add_argument(
        "--llama-python",
        type=Path,
        default=LLAMA_PYTHON,
        help="a Python that imports llama_cpp (default: bench/build_llama.sh's venv)",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if WORK/model is there")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from hubmerge.gguf.writer import write_gguf

    folder = args.work / "model"
    trained = args.work / "training.json"
    if args.retrain or not trained.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        training = train(folder, args.steps)
        trained.write_text(json.dumps(training) + "\n")
    training = json.loads(trained.read_text())
    print(json.dumps({"trained": training}), flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    reference = greedy(folder, prompt_ids, args.new)
    files = {}
    for gguf_type in args.types.split(","):
        written = write_gguf(folder, folder / f"tiny-{gguf_type.upper()}.gguf", gguf_type)
        files[gguf_type] = str(written.path)
    if not args.llama_python.is_file():
        raise SystemExit(
            "run bench/build_llama.sh first (builds llama-cpp-python into bench/work/llama-venv)"
        )
    done = subprocess.run(
        [str(args.llama_python), "-c", _LLAMA, json.dumps(files), json.dumps(PROMPTS), str(args.new)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    llama = json.loads(done.stdout.splitlines()[-1])
    rows: list[dict[str, Any]] = [{"trained": training}]
    for i, text in enumerate(PROMPTS):
        rows.append({"prompt": text, "transformers": tokenizer.decode(reference[i])})
    for gguf_type, path in files.items():
        from_file = greedy(folder, prompt_ids, args.new, Path(path).name)
        for i, text in enumerate(PROMPTS):
            ours = llama[gguf_type][i]
            rows.append({
                "type": gguf_type,
                "prompt": text,
                "prompt_ids_equal": ours["prompt_ids"] == prompt_ids[i],
                "llama_vs_safetensors": f"{agree(ours['tokens'], reference[i])}/{args.new}",
                "llama_vs_transformers_on_gguf": f"{agree(ours['tokens'], from_file[i])}/{args.new}",
                "transformers_on_gguf_vs_safetensors": f"{agree(from_file[i], reference[i])}/{args.new}",
                "llama_text": ours["text"],
            })  # fmt: skip
    for row in rows[1:]:
        print(json.dumps(row), flush=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
