"""The GGUF files of a merge: their names, the model card of the repo that holds them, and the lines the
merged model's own card links them with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..merging.plan import MergePlan
    from .writer import GgufFile

__all__ = ["companion_card", "file_name", "gguf_links"]

# What each type costs and is for, as llama.cpp's quantize tool describes them.
TYPE_NOTES = {
    "q4_k_m": "the usual choice: small, good quality",
    "q5_k_m": "larger, closer to the original",
    "q6_k": "near the original",
    "q8_0": "practically the original, half of BF16's size",
    "f16": "unquantized (16-bit)",
    "bf16": "unquantized, the merge's own precision",
    "f32": "unquantized, 32-bit",
}


def file_name(model_name: str, gguf_type: str) -> str:
    """`Qwen2.5-1.5B-merged-Q4_K_M.gguf`: the name llama.cpp's tools and the Hub's GGUF repos use."""
    return f"{model_name}-{gguf_type.upper()}.gguf"


def model_name(plan: MergePlan) -> str:
    out = plan.recipe.output
    return out.repo.split("/")[-1] if out.repo else out.dir.name


def gguf_links(plan: MergePlan) -> dict[str, Any] | None:
    """What the merged model's card says about its GGUF files: the repo (or none: beside the weights) and
    each file's name and type."""
    out = plan.recipe.output
    if not out.gguf:
        return None
    name = model_name(plan)
    files = [{"name": file_name(name, t), "type": t.upper()} for t in out.gguf]
    repo = out.gguf_repo if out.gguf_repo != out.repo else None
    return {"repo": repo, "files": files}


def companion_card(plan: MergePlan, files: Sequence[GgufFile], license: str | None) -> str:
    """README.md of the `{repo}-GGUF` repo: front matter naming the merged model as the base it quantizes,
    a table of the files, and how to run each with llama.cpp, Ollama and LM Studio."""
    out = plan.recipe.output
    base, repo, branch = out.repo, out.gguf_repo, out.branch or "main"
    front = ["---", f"base_model: {base}", "base_model_relation: quantized"]
    if license:
        front.append(f"license: {license}")
    front += ["library_name: gguf", "tags:", "- gguf", "- llama.cpp", "- hubmerge", "---", ""]
    lines = [
        f"# {repo.split('/')[-1] if repo else model_name(plan)}",
        "",
        f"GGUF files of [{base}](https://huggingface.co/{base}), written by hubmerge from the merged weights "
        "(the same recipe and run). Quantized without an importance matrix, as `llama-quantize` does by default.",
        "",
        "| File | Type | Size | Bits per weight | Notes |",
        "|---|---|---|---|---|",
    ]
    for f in files:
        lines.append(
            f"| [{f.path.name}](https://huggingface.co/{repo}/blob/{branch}/{f.path.name}) | {f.type.upper()} | "
            f"{f.size / 1e9:.2f} GB | {f.bits_per_weight:.2f} | {TYPE_NOTES[f.type]} |"
        )
    first = files[0].type.upper()
    lines += [
        "",
        "## Run it",
        "",
        "llama.cpp:",
        "",
        "```sh",
        f"llama-cli -hf {repo}:{first}",
        f"llama-server -hf {repo}:{first}",
        "```",
        "",
        "Ollama:",
        "",
        "```sh",
        f"ollama run hf.co/{repo}:{first}",
        "```",
        "",
        f"LM Studio: search for `{repo}` in the model search, or `lms get {repo}`.",
        "",
        "Replace the type after `:` to pick another file.",
    ]
    return "\n".join(front + lines) + "\n"


def write_companion_card(
    folder: Path, plan: MergePlan, files: Sequence[GgufFile], license: str | None
) -> Path:
    path = folder / "README.md"
    path.write_text(companion_card(plan, files, license), encoding="utf-8")
    return path
