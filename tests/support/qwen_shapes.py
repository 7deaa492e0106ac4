"""Qwen2.5-shaped repos for the local test Hub: real tensor names, shapes, dtype (bf16) and shard counts, with
sparse shards (`support.hubserver.SparseFile`) whose header alone is stored, since a plan reads only headers.

Used by tests/test_streaming.py and by bench/shaped_plans.py (the "Big models" table in docs/big-models.md).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from support.hubserver import LocalHub, SparseFile

VOCAB = 151936


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    shards: int  # as in the official repo (1: a single model.safetensors)


# From the official config.json files and repo trees of Qwen/Qwen2.5-{size}.
SHAPES = {
    s.name: s
    for s in (
        Shape("0.5B", 896, 4864, 24, 14, 2, True, 1),
        Shape("1.5B", 1536, 8960, 28, 12, 2, True, 1),
        Shape("3B", 2048, 11008, 36, 16, 2, True, 2),
        Shape("7B", 3584, 18944, 28, 28, 4, False, 4),
        Shape("14B", 5120, 13824, 48, 40, 8, False, 8),
        Shape("32B", 5120, 27648, 64, 40, 8, False, 17),
        Shape("72B", 8192, 29568, 80, 64, 8, False, 37),
    )
}


def tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order transformers saves them."""
    h, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape.tied:
        out.append(("lm_head.weight", (VOCAB, h)))
    return out


def _sparse_safetensors(entries: list[tuple[str, tuple[int, ...]]]) -> SparseFile:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in sorted(entries):  # the safetensors library lays data out by name
        size = 2
        for d in dims:
            size *= d
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return SparseFile(prefix, len(prefix) + offset)


def repo_files(shape: Shape) -> dict[str, bytes | SparseFile]:
    """config.json and the weights: one sparse file, or shards of about equal size and an index."""
    all_tensors = tensors(shape)
    sizes = [2 * _numel(dims) for _, dims in all_tensors]
    total = sum(sizes)
    files: dict[str, bytes | SparseFile] = {}
    if shape.shards == 1:
        files["model.safetensors"] = _sparse_safetensors(all_tensors)
    else:
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        filled = 0
        for entry, size in zip(all_tensors, sizes):
            if (
                groups[-1]
                and filled + size > total / shape.shards * len(groups)
                and len(groups) < shape.shards
            ):
                groups.append([])
            groups[-1].append(entry)
            filled += size
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        weight_map = {}
        for name, group in zip(names, groups):
            files[name] = _sparse_safetensors(group)
            weight_map |= {t: name for t, _ in group}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": shape.tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    }
    files["config.json"] = json.dumps(config, indent=2).encode()
    return files


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


FAMILY = ("", "-Math", "-Coder", "-Instruct")  # base + 3, named as the real repos are


def add_shaped_repos(hub: LocalHub, size: str) -> list[str]:
    """Base + 3 repos of `size` (e.g. "Qwen/Qwen2.5-7B", "-Math-", "-Coder-", "-Instruct"); returns their ids."""
    shape = SHAPES[size]
    files = repo_files(shape)
    ids = []
    for i, part in enumerate(FAMILY):
        repo = f"shaped/Qwen2.5{part}-{size}" if part != "-Instruct" else f"shaped/Qwen2.5-{size}-Instruct"
        hub.create_repo(repo)
        card = {"README.md": b"---\nlicense: apache-2.0\n---\n# a Qwen2.5-shaped test model, copy %d\n" % i}
        hub.commit(repo, {**files, **card}, "Upload model")  # type: ignore[dict-item]
        ids.append(repo)
    return ids


def recipe_text(ids: list[str], method: str = "task_arithmetic", repo: str | None = None) -> str:
    base, *models = ids
    quoted = ", ".join(f'"{m}"' for m in models)
    params = {"task_arithmetic": "scaling_factor = 0.5", "ties": "scaling_factor = 0.8\nthreshold = 20"}
    push = f'repo = "{repo}"\n' if repo else ""
    return (
        f'method = "{method}"\nbase = "{base}"\nmodels = [{quoted}]\n'
        f'[parameters]\n{params[method]}\n[output]\ndir = "out"\n{push}'
    )
