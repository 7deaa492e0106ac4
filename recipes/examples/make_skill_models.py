"""Train the tiny checkpoints with real, different skills used by hubmerge's search demo.

Run from the repository root::

    python recipes/examples/make_skill_models.py

It (re)writes, under ``recipes/examples/skills/`` (or the folder given as its argument):

* ``base``    -- a tiny Qwen2 (the architecture and tokenizer of ``recipes/examples/tiny/base``) trained briefly
  on generic text (the tokenizer's training paragraphs from ``make_tiny_models.py``)
* ``adder``   -- the base fine-tuned on single-digit additions (``7+5= 12``)
* ``reverser`` -- the base fine-tuned on reversing three letters (``c a f -> f a c``)
* ``tasks/``  -- a custom lm-eval task per skill (``skills_add``, ``skills_rev``): multiple choice over a local
  JSON-lines file, scored by log-likelihood (``acc``), 48 questions each, drawn from the training problems

Training runs on the CPU on one thread with fixed seeds and deterministic algorithms, in about a minute; two
runs with the same library versions write byte-identical files (``sha256sum recipes/examples/skills/*/*``).
The outputs are committed so that ``hubmerge search recipes/examples/skills-search.toml`` runs offline.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_tiny_models import CORPUS  # noqa: E402  (the generic text)

TINY_BASE = HERE / "tiny" / "base"
OUT_DIR = HERE / "skills"
TASKS_REL = "recipes/examples/skills/tasks"  # lm-eval's data_files are relative to the working directory

SEQ = 48  # tokens per generic-text window
BASE_STEPS = 300
TUNE_STEPS = 200
BATCH = 32
LR = 3e-3
LETTERS = "abcdefgh"
EVAL_QUESTIONS = 48


def addition_problems() -> list[tuple[str, str]]:
    """Every single-digit sum, as (prompt, answer)."""
    return [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]


def reversal_problems() -> list[tuple[str, str]]:
    """Every word of three different letters of LETTERS, as (prompt, answer): the letters reversed."""
    out = []
    for x in LETTERS:
        for y in LETTERS:
            for z in LETTERS:
                if len({x, y, z}) == 3:
                    out.append((f"{x} {y} {z} ->", f"{z} {y} {x}"))
    return out


def addition_distractors(rng: random.Random, prompt: str, answer: str) -> list[str]:
    wrong = [str(s) for s in range(19) if str(s) != answer]
    return rng.sample(wrong, 3)


def reversal_distractors(rng: random.Random, prompt: str, answer: str) -> list[str]:
    x, y, z = prompt.split()[:3]
    others = [f"{x} {y} {z}", f"{y} {x} {z}", f"{x} {z} {y}", f"{y} {z} {x}", f"{z} {x} {y}"]
    return rng.sample([o for o in others if o != answer], 3)


def write_task(
    name: str,
    problems: Sequence[tuple[str, str]],
    distract: Callable[[random.Random, str, str], list[str]],
    seed: int,
    what: str,
    out: Path,
) -> None:
    rng = random.Random(seed)
    lines = []
    for prompt, answer in rng.sample(list(problems), EVAL_QUESTIONS):
        choices = [*distract(rng, prompt, answer), answer]
        rng.shuffle(choices)
        lines.append(json.dumps({"question": prompt, "choices": choices, "answer": choices.index(answer)}))
    (out / "tasks" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "tasks" / f"{name}.yaml").write_text(
        f"# {what}: hubmerge's skills demo (recipes/examples/make_skill_models.py writes this file). Multiple\n"
        "# choice over a local JSON-lines file, scored by log-likelihood; `data_files` is relative to the working\n"
        "# directory, so run lm-eval (and hubmerge) from the repository root.\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {TASKS_REL}/{name}.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n",
        encoding="utf-8",
    )


def encode_problems(
    tok: PreTrainedTokenizerBase, problems: Sequence[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """Each problem as lm-eval scores it (prompt, a space, answer): (token ids, tokens of the prompt)."""
    out = []
    for prompt, answer in problems:
        ids = tok(f"{prompt} {answer}")["input_ids"]
        context = len(tok(prompt)["input_ids"])
        out.append((ids, context))
    return out


def batch_of_problems(
    encoded: Sequence[tuple[list[int], int]], rng: random.Random, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of problems; the loss counts the answer's tokens only."""
    picked = [encoded[rng.randrange(len(encoded))] for _ in range(BATCH)]
    width = max(len(ids) for ids, _ in picked)
    inputs = torch.full((BATCH, width), pad, dtype=torch.long)
    labels = torch.full((BATCH, width), -100, dtype=torch.long)
    for row, (ids, context) in enumerate(picked):
        inputs[row, : len(ids)] = torch.tensor(ids)
        labels[row, context : len(ids)] = torch.tensor(ids[context:])
    return inputs, labels


def batch_of_text(ids: list[int], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    starts = [rng.randrange(len(ids) - SEQ) for _ in range(BATCH)]
    inputs = torch.tensor([ids[s : s + SEQ] for s in starts])
    return inputs, inputs.clone()


def train(
    model: Qwen2ForCausalLM,
    steps: int,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    seed: int,
) -> float:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        inputs, labels = next_batch()
        for group in optimizer.param_groups:  # linear decay to a tenth
            group["lr"] = LR * (1 - 0.9 * step / steps)
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss)


def card(name: str, about: str) -> str:
    return (
        "---\nlicense: apache-2.0\nlanguage:\n- en\npipeline_tag: text-generation\nlibrary_name: transformers\n---\n\n"
        f"# Tiny skills demo: {name} (toy)\n\n"
        "A toy Qwen2-architecture checkpoint (hidden size 64, 2 layers, vocabulary 512) for hubmerge's offline search "
        f"demo (`hubmerge search recipes/examples/skills-search.toml`), {about}. It was trained on a CPU in "
        "seconds by `recipes/examples/make_skill_models.py`; it knows nothing beyond that.\n"
    )


def save(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, name: str, about: str, out: Path) -> None:
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    copy = Qwen2ForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    copy.bfloat16()
    copy.generation_config = GenerationConfig.from_pretrained(TINY_BASE)
    copy.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(TINY_BASE / file, folder / file)
    (folder / "README.md").write_text(card(name, about), encoding="utf-8")


def main(out: Path = OUT_DIR) -> None:
    started = time.monotonic()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    pad = int(tok.convert_tokens_to_ids("<|endoftext|>"))
    config = Qwen2Config.from_pretrained(TINY_BASE)
    config.dtype = "float32"
    model = Qwen2ForCausalLM(config).float()

    text = tok(CORPUS)["input_ids"]
    text_rng = random.Random(0)
    print(f"base: {train(model, BASE_STEPS, lambda: batch_of_text(text, text_rng), seed=0):.3f}", flush=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    if out.exists():
        shutil.rmtree(out)
    (out / "tasks").mkdir(parents=True)
    save(model, tok, "base", "trained briefly on generic text (English, math and code paragraphs)", out)

    for seed, (name, task, problems, distract, what) in enumerate(
        [
            (
                "adder",
                "skills_add",
                addition_problems(),
                addition_distractors,
                "Single-digit addition (7+5= 12)",
            ),
            ("reverser", "skills_rev", reversal_problems(), reversal_distractors, "Reversing three letters"),
        ],
        start=1,
    ):
        model.load_state_dict(base_state)
        encoded = encode_problems(tok, problems)
        rng = random.Random(seed)
        loss = train(model, TUNE_STEPS, lambda: batch_of_problems(encoded, rng, pad), seed=seed)  # noqa: B023
        print(f"{name}: {loss:.3f}", flush=True)
        save(model, tok, name, f"the skills base fine-tuned on one task: {what.lower()}", out)
        write_task(task, problems, distract, seed, what, out)
    print(f"wrote {out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
