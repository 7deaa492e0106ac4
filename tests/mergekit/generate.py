"""Regenerate the mergekit reference fixtures (inputs, outputs, manifest).

Run with mergekit's own venv, never hubmerge's:

    /work/mkvenv/bin/python tests/mergekit/generate.py            # everything
    /work/mkvenv/bin/python tests/mergekit/generate.py ties-filter-weight   # only configs whose name contains this

It builds two sets of tiny Qwen2 checkpoints with a seeded torch generator, then runs `mergekit-yaml`
(from the same venv as this interpreter) on every `configs/*.yml` for both sets, with the working
directory set to the set's folder so the YAML's relative model paths (`base`, `m0`, ...) resolve there.
Outputs keep only `model.safetensors` and the `config.json` mergekit wrote. `manifest.json` records each
run. The hubmerge test suite reads these files and must never import mergekit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO / "tests" / "data" / "mergekit"
MODELS = DATA / "models"
OUTPUTS = DATA / "outputs"
CONFIGS = HERE / "configs"
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"

# name -> (dtype, tie_word_embeddings, generator seed)
SETS = {
    "f32-tied": (torch.float32, True, 1000),
    "bf16-untied": (torch.bfloat16, False, 2000),
}
FINETUNES = ("m0", "m1", "m2")
# Methods whose result depends on an RNG (Bernoulli masks): seeded, but not matchable elementwise.
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
# Tokens of the tiny tokenizer: 117 printable characters + 3 specials = 120 < vocab_size 128,
# like Qwen2.5 (151665 tokens, 151936 embedding rows).
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_CHARS = 117


def qwen2_config(dtype: torch.dtype, tied: bool) -> Qwen2Config:
    return Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=N_CHARS,
        eos_token_id=N_CHARS,
        dtype=dtype,
    )


def base_state(model: Qwen2ForCausalLM, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Base weights drawn from `gen` (not from transformers' init): N(0, 0.02) matrices and biases, norms 1 + N(0, 0.02)."""
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        noise = torch.randn(p.shape, generator=gen) * 0.02
        state[name] = (1 + noise) if name.endswith("norm.weight") else noise
    return state


def finetune_delta(which: str, name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Task vector of each fine-tune, in float32.

    m0: dense N(0, 0.01) everywhere.
    m1: sparse: norms, biases and layer 1's attention exactly unchanged; elsewhere ~20 % of entries get N(0, 0.02).
    m2: MLP-heavy: N(0, 0.03) on the MLP, N(0, 0.004) elsewhere, plus a small positive drift on the
        embeddings (so the sign election has a systematic disagreement to settle).
    """
    noise = torch.randn(shape, generator=gen)
    if which == "m0":
        return noise * 0.01
    if which == "m1":
        keep = torch.rand(shape, generator=gen) < 0.2
        if name.endswith("norm.weight") or name.endswith(".bias") or "layers.1.self_attn" in name:
            return torch.zeros(shape)
        return noise * 0.02 * keep
    if ".mlp." in name:
        return noise * 0.03
    delta = noise * 0.004
    if "embed_tokens" in name or name == "lm_head.weight":
        delta = delta + 0.003
    return delta


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(33, 33 + N_CHARS)]
    vocab = {c: i for i, c in enumerate(chars)}
    for i, tok in enumerate(SPECIALS):
        vocab[tok] = N_CHARS + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0])
    fast.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    fast.save_pretrained(folder)


def build_inputs() -> None:
    if MODELS.exists():
        shutil.rmtree(MODELS)
    for set_name, (dtype, tied, seed) in SETS.items():
        gen = torch.Generator().manual_seed(seed)
        cfg = qwen2_config(dtype, tied)
        model = Qwen2ForCausalLM(cfg)
        base = base_state(model, gen)
        # Fine-tunes are base (as stored, in the set's dtype) + delta, rounded once to the set's dtype.
        stored_base = {k: v.to(dtype) for k, v in base.items()}
        variants = {"base": stored_base}
        for which in FINETUNES:
            variants[which] = {
                k: (v.float() + finetune_delta(which, k, v.shape, gen)).to(dtype)
                for k, v in stored_base.items()
            }
        for name, state in variants.items():
            model = Qwen2ForCausalLM(qwen2_config(dtype, tied)).to(dtype)
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
            if tied:
                model.tie_weights()
            folder = MODELS / set_name / name
            model.save_pretrained(folder, safe_serialization=True)
            write_tokenizer(folder)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_one(config: Path, set_name: str) -> tuple[dict[str, object], float]:
    spec = yaml.safe_load(config.read_text())
    method = spec["merge_method"]
    deterministic = method not in RANDOM_METHODS
    name = config.stem
    out = OUTPUTS / f"{name}__{set_name}"
    if out.exists():
        shutil.rmtree(out)
    cwd = MODELS / set_name
    args = [
        os.path.relpath(config, cwd),
        os.path.relpath(out, cwd),
        "--no-write-model-card",  # the card probes the Hub for local names like `m0` (repo_exists), offline it crashes
        "--quiet",
    ]
    if not deterministic:
        args += ["--random-seed", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    started = time.monotonic()
    proc = subprocess.run(
        [str(MERGEKIT_YAML), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    record: dict[str, object] = {
        "name": f"{name}__{set_name}",
        "config": str(config.relative_to(REPO)),
        "input_set": set_name,
        "merge_method": method,
        "output": str(out.relative_to(REPO)),
        "deterministic": deterministic,
        "cwd": str(cwd.relative_to(REPO)),
        "command": " ".join(["mergekit-yaml", *args]),
        "returncode": proc.returncode,
    }
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        record["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "(no stderr)"
        if out.exists():
            shutil.rmtree(out)
        return record, seconds
    for extra in sorted(out.iterdir()):
        if extra.name not in ("model.safetensors", "config.json"):
            if extra.is_dir():
                shutil.rmtree(extra)
            else:
                extra.unlink()
    record["files"] = {p.name: sha256(p) for p in sorted(out.iterdir())}
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line or "Warning" in line]
    if warnings:
        record["warnings"] = warnings
    return record, seconds


def mergekit_version() -> str:
    from importlib.metadata import version

    return version("mergekit")


def main(argv: list[str]) -> int:
    only = argv[0] if argv else None
    if only is None:
        build_inputs()
    configs = sorted(p for p in CONFIGS.glob("*.yml") if only is None or only in p.stem)
    jobs = [(c, s) for c in configs for s in SETS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        timed = list(pool.map(lambda job: run_one(*job), jobs))
    records = [record for record, _ in timed]
    manifest_path = HERE / "manifest.json"
    old = json.loads(manifest_path.read_text())["runs"] if (only and manifest_path.exists()) else []
    merged = {r["name"]: r for r in old}
    merged.update({r["name"]: r for r in records})
    if only is None:
        stale = {p.name for p in OUTPUTS.iterdir()} - set(merged) if OUTPUTS.exists() else set()
        for name in stale:
            shutil.rmtree(OUTPUTS / name)
    from importlib.metadata import version

    manifest = {
        "mergekit_version": mergekit_version(),
        "torch_version": torch.__version__,
        "transformers_version": version("transformers"),
        "inputs": {
            s: {
                m: {p.name: sha256(p) for p in sorted((MODELS / s / m).iterdir()) if p.is_file()}
                for m in ("base", *FINETUNES)
            }
            for s in SETS
        },
        "runs": [merged[k] for k in sorted(merged)],
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    failed = [r for r in records if r["returncode"] != 0]
    for r, seconds in timed:
        status = "ok" if r["returncode"] == 0 else f"FAILED: {r['error']}"
        print(f"{r['name']:50s} {seconds:5.1f}s {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
