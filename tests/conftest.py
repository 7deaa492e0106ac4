"""Shared fixtures: tiny random Qwen2 checkpoints built in code, and a CLI runner.

Checkpoints are written with the `safetensors` library itself (an independent writer), in the layouts
real repos use: a single `model.safetensors`, or shards with `model.safetensors.index.json`; tied
(no `lm_head.weight`, as Qwen2.5 ≤ 3B) or untied.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "examples" / "tiny"

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 64, 2, 4, 2, 512


def qwen2_config(tied: bool = True, dtype: str = "bfloat16", **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": 480,
        "eos_token_id": 480,
        "torch_dtype": dtype,
    }
    config.update(overrides)
    return config


def random_state_dict(
    seed: int,
    vocab: int = VOCAB,
    head: bool = False,
    layers: int = LAYERS,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
) -> dict[str, torch.Tensor]:
    """Qwen2 weights; a `hidden` other than HIDDEN needs `hidden_size` (and `intermediate_size`) in the config."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    kv = hidden // HEADS * KV_HEADS
    sd = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + rand(hidden),
            p + "post_attention_layernorm.weight": 1 + rand(hidden),
            p + "self_attn.q_proj.weight": rand(hidden, hidden),
            p + "self_attn.q_proj.bias": rand(hidden),
            p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.k_proj.bias": rand(kv),
            p + "self_attn.v_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.bias": rand(kv),
            p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        }
    if head:
        sd["lm_head.weight"] = rand(vocab, hidden)
    return sd


def write_checkpoint(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    tokenizer: bool = True,
    license: str | None = "apache-2.0",
    **config: object,
) -> Path:
    """Write a checkpoint folder as transformers would; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in state_dict.items()}
    tied = "lm_head.weight" not in tensors
    cfg = qwen2_config(tied=tied, dtype=str(dtype).removeprefix("torch."), **config)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, folder / file, metadata={"format": "pt"})
            weight_map |= {k: file for k in part}
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": weight_map,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if tokenizer:
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
        ):
            shutil.copyfile(TINY / "base" / name, folder / name)
    if license:
        (folder / "README.md").write_text(
            f"---\nlicense: {license}\nlibrary_name: transformers\n---\n# test model\n"
        )
    return folder


@pytest.fixture(scope="session")
def known_hashes_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hubmerge-cache")


@pytest.fixture(autouse=True)
def private_known_hashes(monkeypatch: pytest.MonkeyPatch, known_hashes_store: Path) -> None:
    """The remembered sha256 of source files (`lock.KnownHashes`) go to a folder of this test session, not to
    the user's ~/.cache (`HUBMERGE_CACHE`, inherited by CLI subprocesses)."""
    monkeypatch.setenv("HUBMERGE_CACHE", str(known_hashes_store))


@pytest.fixture(autouse=True)
def no_sanity_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges skip the quick sanity check: it imports transformers' tokenizer and runs a forward pass per model
    (seconds of CPU per tiny merge), and only tests/test_eval.py and tests/test_sanity.py test it (their own
    fixtures turn it back on by removing `HUBMERGE_NO_SANITY`). The CLI (in process or a subprocess, which
    inherits the variable) and the web app read the variable; `hubmerge.merge` called as a library does not,
    so its check is gated on the variable here, at call time."""
    from hubmerge import api

    monkeypatch.setenv("HUBMERGE_NO_SANITY", "1")
    check = api._sanity_check

    def gated(*args: Any, **kwargs: Any) -> Any:
        return None if os.environ.get("HUBMERGE_NO_SANITY") else check(*args, **kwargs)

    monkeypatch.setattr(api, "_sanity_check", gated)


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """`make_model(name, seed, **write_checkpoint options)` → folder under tmp_path/models."""

    def make(name: str, seed: int, head: bool = False, vocab: int = VOCAB, **options: object) -> Path:
        return write_checkpoint(tmp_path / "models" / name, random_state_dict(seed, vocab, head), **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def run_cli(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `hubmerge` entry point in a subprocess (what a user's shell does)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HUBMERGE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@contextmanager
def mounted_tmpfs(folder: Path, size: int | str) -> Iterator[Path]:
    """A tmpfs of `size` bytes (or "2m") mounted on the new folder `folder`: a disk that really fills up."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# TOML text written by the tests themselves, independently of hubmerge's own writer (mergekit_config.py).
def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr spells nan, inf, -inf, 1e-300 as TOML does
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string, control characters escaped
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
