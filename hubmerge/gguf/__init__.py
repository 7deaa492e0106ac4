"""GGUF files of a merge (llama.cpp, Ollama, LM Studio): written from the merged weights after them, a tensor
at a time (`writer.py`, with the quantizers of `quants.py`), into the output folder or a companion folder
with its own card (`card.py`) that is pushed to `{repo}-GGUF`. A run that deletes each shard once uploaded
writes them while the merge writes the shards instead (`open_stream`), and uploads each file once finished."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..merging.plan import MergePlan
    from .writer import GgufFile, GgufStream

__all__ = [
    "card_license",
    "companion_staging",
    "open_stream",
    "write_companion",
    "write_companion_files",
    "write_files",
]


def write_files(plan: MergePlan, weights: Path, folder: Path) -> list[GgufFile]:
    """Write the recipe's `[output] gguf` files of the merged model in `weights` into `folder`."""
    from .card import file_name, model_name
    from .writer import write_gguf

    name = model_name(plan)
    return [write_gguf(weights, folder / file_name(name, t), t, name) for t in plan.recipe.output.gguf]


def open_stream(plan: MergePlan, tokenizer: Path, folder: Path) -> GgufStream:
    """The recipe's `[output] gguf` files in `folder`, to be written shard by shard as the merge writes them
    (`GgufStream.add_shard`), with the merged config and the tokenizer folder's tokenizer."""
    from .card import file_name, model_name
    from .writer import GgufStream

    name = model_name(plan)
    shapes = {t.name: t.shape for t in plan.tensors}
    shards = [(s.file, [(n, shapes[n]) for n, _ in s.tensors]) for s in plan.shards]
    files: dict[str, Path] = {t: folder / file_name(name, t) for t in plan.recipe.output.gguf}
    return GgufStream(plan.config, tokenizer, shards, files, name)


@contextmanager
def companion_staging(plan: MergePlan) -> Iterator[Path]:
    """A staging folder for the companion folder `{dir}-GGUF`, which is replaced as a whole, like the output
    folder (`output.swap_in`); removed unless swapped in."""
    from ..publish.output import check_target, recover, staged

    folder = plan.recipe.output.gguf_dir
    recover(folder)
    check_target(folder, 0)
    with staged(folder) as staging:
        yield staging


def write_companion_files(
    plan: MergePlan,
    staging: Path,
    written: Sequence[GgufFile],
    license: str | None,
    uploaded: Mapping[str, tuple[int, str]] | None = None,
) -> None:
    """The companion folder's card and lock, beside the GGUF files `written`; `uploaded` gives the size and
    sha256 of those already pushed and deleted to save disk (as the output's lock lists deleted shards)."""
    from .. import __version__
    from ..publish.lock import LOCK_FILE, file_sha256
    from .card import write_companion_card

    gone = uploaded or {}
    write_companion_card(staging, plan, written, license)
    files = {}
    for name in [f.path.name for f in written] + ["README.md"]:
        if name in gone:
            size, sha = gone[name]
            files[name] = {"size": size, "sha256": sha}
        else:
            files[name] = {"size": (staging / name).stat().st_size, "sha256": file_sha256(staging / name)}
    lock = {"hubmerge_version": __version__, "model": plan.recipe.output.repo, "output": {"files": files}}
    (staging / LOCK_FILE).write_text(json.dumps(lock, indent=2) + "\n")


def card_license(weights: Path) -> str | None:
    """The license the merged model's card (in `weights`) declares, for the companion card."""
    from huggingface_hub import ModelCard

    license = ModelCard.load(weights / "README.md").data.get("license")
    return str(license) if license is not None else None


def write_companion(plan: MergePlan, weights: Path) -> list[GgufFile]:
    """The companion folder `{dir}-GGUF`: the GGUF files of the merged model in `weights`, their card, and a
    lock listing them (so that a later run may replace it)."""
    from ..publish.output import swap_in

    folder = plan.recipe.output.gguf_dir
    with companion_staging(plan) as staging:
        written = write_files(plan, weights, staging)
        write_companion_files(plan, staging, written, card_license(weights))
        swap_in(staging, folder)
    return [type(f)(folder / f.path.name, f.type, f.size, f.parameters) for f in written]
