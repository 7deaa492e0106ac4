"""Facts about the Qwen2.5 family that hubmerge checks sources against and prints on cards.

From the model table of the Qwen2.5 documentation and technical report (arXiv:2412.15115).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ALWAYS_PRESENT", "QWEN25_SIZES", "Qwen25Size", "qwen25_size"]

# Tensors every Qwen2 checkpoint has, whatever its size (names it shares with the Llama family; the q/k/v
# biases, Qwen2's own, are left out): `validate` checks filter lists against them before any header is read.
ALWAYS_PRESENT = (
    "model.embed_tokens.weight",
    "model.norm.weight",
    *(
        f"model.layers.0.{name}.weight"
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ),
)


@dataclass(frozen=True)
class Qwen25Size:
    name: str  # "1.5B"
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    tie_embedding: bool
    context: str
    generation: str
    license: str  # Hub license id of the base and instruct models


QWEN25_SIZES = (
    Qwen25Size("0.5B", 896, 24, 14, 2, True, "32K", "8K", "apache-2.0"),
    Qwen25Size("1.5B", 1536, 28, 12, 2, True, "32K", "8K", "apache-2.0"),
    Qwen25Size("3B", 2048, 36, 16, 2, True, "32K", "8K", "qwen-research"),
    Qwen25Size("7B", 3584, 28, 28, 4, False, "128K", "8K", "apache-2.0"),
    Qwen25Size("14B", 5120, 48, 40, 8, False, "128K", "8K", "apache-2.0"),
    Qwen25Size("32B", 5120, 64, 40, 8, False, "128K", "8K", "apache-2.0"),
    Qwen25Size("72B", 8192, 80, 64, 8, False, "128K", "8K", "qwen"),
)


def qwen25_size(config: Mapping[str, Any]) -> Qwen25Size | None:
    """The Qwen2.5 size whose hidden size and depth a qwen2 config has, if any."""
    if config.get("model_type") != "qwen2":
        return None
    for size in QWEN25_SIZES:
        if size.hidden_size == config.get("hidden_size") and size.layers == config.get("num_hidden_layers"):
            return size
    return None
