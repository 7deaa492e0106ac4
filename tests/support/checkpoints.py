"""Tiny random Qwen2 checkpoints built in code, written with the `safetensors` library itself (an independent
writer) in the layouts real repos use: a single `model.safetensors`, or shards with
`model.safetensors.index.json`; tied (no `lm_head.weight`, as Qwen2.5 ≤ 3B) or untied. `REPO` is the
repository root, `TINY` its committed tiny example checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
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
