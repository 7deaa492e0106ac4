"""Generate the tiny Qwen2.5 look-alike checkpoints used by hubmerge's offline demo.

Run from the repository root::

    python recipes/examples/make_tiny_models.py

It (re)writes four toy checkpoints under ``recipes/examples/tiny/``:

* ``base``     -- mimics Qwen/Qwen2.5-1.5B (random init, seed 0)
* ``math``     -- mimics Qwen/Qwen2.5-Math-1.5B (base + perturbation, seed 1, 4k context / rope_theta 1e4)
* ``coder``    -- mimics Qwen/Qwen2.5-Coder-1.5B (base + perturbation, seed 2)
* ``instruct`` -- mimics Qwen/Qwen2.5-1.5B-Instruct (base + perturbation, seed 3, eos ``<|im_end|>``)

Every folder holds a Qwen2ForCausalLM (hidden 64, 2 layers, vocab 512, tied embeddings, bfloat16) as a
single ``model.safetensors``, a tiny byte-level BPE tokenizer with Qwen's special tokens and a ChatML chat
template, ``generation_config.json`` and a model card. The outputs are committed to the repository so that
``hubmerge recipes/examples/tiny-ties.toml`` runs offline in seconds; rerun this script only when they need
to change. The script is deterministic: two runs with the same library versions produce byte-identical files
(compare with ``sha256sum recipes/examples/tiny/*/*``). These are NOT the real Qwen models; the weights are
random and the models generate gibberish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

OUT_DIR = Path(__file__).resolve().parent / "tiny"

VOCAB_SIZE = 512  # embedding rows; the tokenizer is a bit shorter, like Qwen's 151936 vs 151665
BPE_VOCAB_SIZE = 480  # byte alphabet (256) + merges, before the special tokens are appended

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2's pre-tokenizer split (the same regex as the real tokenizer.json).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A shortened but faithful version of Qwen2.5's ChatML template (tool calling left out).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (loop.first and message['role'] == 'system') %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Small built-in training text for the BPE tokenizer: English, math and code.
CORPUS = r'''
The quick brown fox jumps over the lazy dog. A merge combines the weights of several fine-tuned models
that share one base model. Each fine-tune adds a task vector: the difference between its weights and the
weights of the base. Merging methods such as task arithmetic, TIES and DARE add these task vectors back to
the base with chosen weights, trim the small entries, and resolve the sign conflicts between them.
You are a helpful assistant. Please answer the question below, and explain your reasoning step by step.
The model was trained on English text, mathematics and source code. It is small, fast and not very smart.
Hello! How can I help you today? I would like to know how to merge two language models into one.
Sure. First, choose a base model. Then list the models to merge, with a weight and a density for each.
Finally, run the merge and upload the result to the Hub, together with a model card that cites the sources.

Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Answer: In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72.
Question: Solve for x: 3x + 7 = 22. Answer: 3x = 22 - 7 = 15, so x = 15 / 3 = 5. The answer is \boxed{5}.
Let f(x) = x^2 - 4x + 4. Then f(x) = (x - 2)^2, so the only root is x = 2 and f(0) = 4.
The sum of the first n positive integers is n(n + 1) / 2; for n = 100 the sum is 5050.
If a + b = 10 and a - b = 4, then 2a = 14, so a = 7 and b = 3. Therefore a * b = 21.
The area of a circle with radius r is \pi r^2, and its circumference is 2 \pi r. With r = 3 the area is 9\pi.
Compute \frac{1}{2} + \frac{1}{3} = \frac{5}{6}. The probability of rolling a 6 twice is 1/36.
\int_0^1 x^2 \, dx = \frac{1}{3}, and \sum_{k=1}^{n} k^2 = \frac{n(n+1)(2n+1)}{6}.

def add(a: int, b: int) -> int:
    """Return the sum of a and b."""
    return a + b


def fibonacci(n: int) -> list[int]:
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]


class Stack:
    def __init__(self) -> None:
        self.items: list[str] = []

    def push(self, item: str) -> None:
        self.items.append(item)

    def pop(self) -> str:
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import json
from pathlib import Path

def load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)

function greet(name) {
    const message = `Hello, ${name}!`;
    console.log(message);
    return message;
}

#include <stdio.h>
int main(void) {
    for (int i = 0; i < 3; i++) {
        printf("%d\n", i);
    }
    return 0;
}

SELECT name, COUNT(*) AS total FROM users WHERE active = 1 GROUP BY name ORDER BY total DESC;
'''


@dataclass(frozen=True)
class Variant:
    """One toy checkpoint and the real model it stands in for."""

    name: str
    real_name: str
    seed: int
    # Parameter-name prefixes that get a larger change than the rest (empty for the base).
    focus: tuple[str, ...]
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    chat_eos: bool = False  # instruct models stop on <|im_end|>
    tags: tuple[str, ...] = ()

    @property
    def is_base(self) -> bool:
        return self.name == "base"


VARIANTS: tuple[Variant, ...] = (
    Variant(name="base", real_name="Qwen2.5-1.5B", seed=0, focus=()),
    Variant(
        name="math",
        real_name="Qwen2.5-Math-1.5B",
        seed=1,
        focus=("model.layers.0.mlp.",),
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    Variant(
        name="coder",
        real_name="Qwen2.5-Coder-1.5B",
        seed=2,
        focus=("model.layers.1.self_attn.", "model.embed_tokens."),
        tags=("code", "qwen", "qwen-coder", "codeqwen"),
    ),
    Variant(
        name="instruct",
        real_name="Qwen2.5-1.5B-Instruct",
        seed=3,
        focus=("model.layers.0.self_attn.", "model.layers.1.mlp.", "model.norm."),
        chat_eos=True,
        tags=("chat",),
    ),
)

INIT_STD = 0.02
# Task-vector scales. Matrices have std 0.02, so 0.002 is a ~10% change (well above bfloat16's ~0.4%
# resolution); RMSNorm weights sit at 1.0, where a bfloat16 step is ~0.008, so they get a larger change.
DELTA_STD = {"matrix": 0.002, "norm": 0.02}
FOCUS_MULTIPLIER = 5.0


def build_tokenizer() -> Tokenizer:
    """Train a tiny Qwen2-style byte-level BPE on CORPUS and append Qwen's special tokens after it."""
    tok = Tokenizer(
        models.BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.strip().splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, expected {BPE_VOCAB_SIZE}")
    # Like Qwen, the special tokens come right after the regular vocabulary.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise RuntimeError(f"{token} is missing from the tokenizer")
        ids[token] = token_id
    return ids


def hf_tokenizer(tok: Tokenizer, variant: Variant) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END if variant.chat_eos else ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
        add_prefix_space=False,
    )


def make_config(variant: Variant, ids: dict[str, int]) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=variant.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": variant.rope_theta},
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        use_cache=True,
        use_sliding_window=False,
        max_window_layers=2,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END] if variant.chat_eos else ids[ENDOFTEXT],
        dtype="bfloat16",
    )


def make_generation_config(variant: Variant, ids: dict[str, int]) -> GenerationConfig:
    eot, im_end = ids[ENDOFTEXT], ids[IM_END]
    if variant.chat_eos:
        return GenerationConfig(
            bos_token_id=eot,
            pad_token_id=eot,
            eos_token_id=[im_end, eot],
            do_sample=True,
            temperature=0.7,
            top_p=0.8,
            top_k=20,
            repetition_penalty=1.05,
        )
    return GenerationConfig(bos_token_id=eot, eos_token_id=eot, do_sample=False, max_new_tokens=2048)


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def base_weights(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """Seed-0 float32 weights: N(0, 0.02) for matrices and biases, ones for RMSNorm weights."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for name, param in sorted(model.named_parameters()):  # tied lm_head is not listed separately
        if is_norm(name):
            out[name] = torch.ones(param.shape)
        else:
            out[name] = torch.randn(param.shape, generator=gen) * INIT_STD
    return out


def perturb(weights: dict[str, torch.Tensor], variant: Variant) -> dict[str, torch.Tensor]:
    """Base + a small seeded change everywhere, larger on the variant's focus layers."""
    gen = torch.Generator().manual_seed(variant.seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(weights):
        std = DELTA_STD["norm" if is_norm(name) else "matrix"]
        if name.startswith(variant.focus):
            std *= FOCUS_MULTIPLIER
        out[name] = weights[name] + torch.randn(weights[name].shape, generator=gen) * std
    return out


def model_card(variant: Variant) -> str:
    lines = [
        "---",
        "license: apache-2.0",
        f"license_link: https://huggingface.co/Qwen/{variant.real_name}/blob/main/LICENSE",
        "language:",
        "- en",
        "pipeline_tag: text-generation",
    ]
    if not variant.is_base:
        lines.append("base_model: Qwen/Qwen2.5-1.5B")
    if variant.tags:
        lines.append("tags:")
        lines.extend(f"- {tag}" for tag in variant.tags)
    lines += ["library_name: transformers", "---", ""]
    lines.append(f"# Tiny {variant.real_name} (toy)")
    lines.append("")
    lines.append(
        f"This is a toy, randomly initialised Qwen2-architecture checkpoint (hidden size 64, 2 layers, "
        f"vocabulary 512) that stands in for [Qwen/{variant.real_name}](https://huggingface.co/Qwen/"
        f"{variant.real_name}) in hubmerge's offline demo (`hubmerge recipes/examples/tiny-ties.toml`). "
        "It was generated by `recipes/examples/make_tiny_models.py`"
        + (" as a seeded perturbation of the tiny base model" if not variant.is_base else "")
        + f". It is NOT the real {variant.real_name}: its weights are random, its tokenizer is a tiny BPE "
        "trained on a few paragraphs, and it produces gibberish."
    )
    return "\n".join(lines) + "\n"


def save_variant(
    variant: Variant, weights: dict[str, torch.Tensor], tok: Tokenizer, ids: dict[str, int], out_dir: Path
) -> Path:
    folder = out_dir / variant.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    torch.manual_seed(variant.seed)  # the constructor's own init is overwritten below, but keep it seeded
    model = Qwen2ForCausalLM(make_config(variant, ids))
    with torch.no_grad():
        params = dict(model.named_parameters())
        if sorted(params) != sorted(weights):
            raise RuntimeError("parameter names do not match the generated weights")
        for name, value in weights.items():
            params[name].copy_(value)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")
    model.bfloat16()
    model.generation_config = make_generation_config(variant, ids)
    # transformers 5 always writes safetensors (safe_serialization is no longer a parameter) and drops the
    # tied lm_head.weight, so this gives a single model.safetensors.
    model.save_pretrained(folder)

    hf_tokenizer(tok, variant).save_pretrained(folder)
    set_tokenizer_class(folder / "tokenizer_config.json")
    (folder / "README.md").write_text(model_card(variant), encoding="utf-8")
    return folder


def set_tokenizer_class(path: Path) -> None:
    """Record the tokenizer class as "Qwen2Tokenizer", like the real Qwen2.5 repositories.

    transformers 5 writes the generic "TokenizersBackend" class name, which transformers 4.x cannot resolve;
    "Qwen2Tokenizer" loads this tokenizer.json unchanged in both (4.x picks Qwen2TokenizerFast).
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    # Same formatting as transformers' own writer.
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    return header


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def verify(folder: Path, variant: Variant, weights: dict[str, torch.Tensor], ids: dict[str, int]) -> None:
    header = safetensors_header(folder / "model.safetensors")
    if header.get("__metadata__") != {"format": "pt"}:
        raise RuntimeError(f"{folder}: unexpected safetensors metadata {header.get('__metadata__')}")
    if "lm_head.weight" in header:
        raise RuntimeError(f"{folder}: lm_head.weight should be tied, not stored")
    if {v["dtype"] for k, v in header.items() if k != "__metadata__"} != {"BF16"}:
        raise RuntimeError(f"{folder}: tensors are not all bfloat16")

    capture = _Capture()
    hf_logger = hf_logging.get_logger("transformers")
    hf_logger.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = cast(
                "tuple[Qwen2ForCausalLM, dict[str, Any]]",
                AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True),
            )
    finally:
        hf_logger.removeHandler(capture)
    problems = {k: v for k, v in info.items() if v}
    logged = capture.messages + [str(w.message) for w in caught]
    if problems or logged:  # e.g. transformers 5's LOAD REPORT of missing/unexpected keys
        raise RuntimeError(f"{folder}: loading problems {problems} {logged}")
    if model.dtype != torch.bfloat16 or not model.config.tie_word_embeddings:
        raise RuntimeError(
            f"{folder}: loaded with dtype {model.dtype}, tied={model.config.tie_word_embeddings}"
        )
    loaded = model.state_dict()
    for name, value in weights.items():
        if not torch.equal(loaded[name], value.to(torch.bfloat16)):
            raise RuntimeError(f"{folder}: {name} differs from the generated weights")
    if not torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"]):
        raise RuntimeError(f"{folder}: lm_head.weight is not tied after loading")

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] != [ids[t] for t in SPECIAL_TOKENS]:
        raise RuntimeError(f"{folder}: special token ids differ")
    sample = "Solve 3x + 7 = 22 in Python: print((22 - 7) / 3)  # café ünïcode ✓\n"
    encoded = tokenizer(sample, add_special_tokens=True)["input_ids"]
    if tokenizer.decode(encoded) != sample:
        raise RuntimeError(f"{folder}: tokenizer does not round-trip {sample!r}")

    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    if prompt != expected:
        raise RuntimeError(f"{folder}: unexpected chat prompt {prompt!r}")
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"][0, 0].item() != ids[IM_START]:
        raise RuntimeError(f"{folder}: <|im_start|> is not encoded as one special token")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    print(f"  {variant.name}: generated {new_tokens.tolist()} -> {tokenizer.decode(new_tokens)!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    parser.add_argument("--skip-verify", action="store_true", help="do not reload and test the outputs")
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir

    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()
    tok = build_tokenizer()
    ids = special_token_ids(tok)
    print(f"tokenizer: {tok.get_vocab_size()} tokens (embedding rows {VOCAB_SIZE}); special ids {ids}")

    base = base_weights(Qwen2ForCausalLM(make_config(VARIANTS[0], ids)))
    folders: list[tuple[Variant, Path]] = []
    all_weights: dict[str, dict[str, torch.Tensor]] = {}
    for variant in VARIANTS:
        all_weights[variant.name] = base if variant.is_base else perturb(base, variant)
        folders.append((variant, save_variant(variant, all_weights[variant.name], tok, ids, out_dir)))

    if not args.skip_verify:
        print("verifying:")
        for variant, folder in folders:
            verify(folder, variant, all_weights[variant.name], ids)

    print("files:")
    for _, folder in folders:
        for path in sorted(folder.iterdir()):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            print(f"  {path.relative_to(out_dir)!s:42} {path.stat().st_size:>9,} B  sha256 {digest}")
        total = sum(p.stat().st_size for p in folder.iterdir())
        print(f"  {folder.name + '/ total':42} {total:>9,} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
