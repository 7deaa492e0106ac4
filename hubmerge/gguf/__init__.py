"""GGUF files of a merge (llama.cpp, Ollama, LM Studio): written from the merged weights after them, a tensor
at a time (`writer.py`, with the quantizers of `quants.py`), into the output folder or a companion folder
with its own card (`card.py`) that is pushed to `{repo}-GGUF`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..plan import MergePlan
    from .writer import GgufFile

__all__ = ["write_companion", "write_files"]


def write_files(plan: MergePlan, weights: Path, folder: Path) -> list[GgufFile]:
    """Write the recipe's `[output] gguf` files of the merged model in `weights` into `folder`."""
    from .card import file_name, model_name
    from .writer import write_gguf

    name = model_name(plan)
    return [write_gguf(weights, folder / file_name(name, t), t, name) for t in plan.recipe.output.gguf]


def write_companion(plan: MergePlan, weights: Path) -> list[GgufFile]:
    """The companion folder `{dir}-GGUF` (replaced as a whole, like the output folder): the GGUF files of
    the merged model in `weights`, their card, and a lock listing them (so that a later run may replace it)."""
    from huggingface_hub import ModelCard

    from .. import __version__
    from ..lock import LOCK_FILE, file_sha256
    from ..output import check_target, recover, staged, swap_in
    from .card import write_companion_card

    folder = plan.recipe.output.gguf_dir
    recover(folder)
    check_target(folder, 0)
    with staged(folder) as staging:
        written = write_files(plan, weights, staging)
        license = ModelCard.load(weights / "README.md").data.get("license")
        write_companion_card(staging, plan, written, license)
        names = [f.path.name for f in written] + ["README.md"]
        files = {n: {"size": (staging / n).stat().st_size, "sha256": file_sha256(staging / n)} for n in names}
        lock = {"hubmerge_version": __version__, "model": plan.recipe.output.repo, "output": {"files": files}}
        (staging / LOCK_FILE).write_text(json.dumps(lock, indent=2) + "\n")
        swap_in(staging, folder)
    return [type(f)(folder / f.path.name, f.type, f.size, f.parameters) for f in written]
