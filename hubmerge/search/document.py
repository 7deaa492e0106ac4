"""A recipe as a TOML document that can be written elsewhere (a trial's recipe in scratch, `best.toml`), by
`recipe.write.toml_document`.

The document is the recipe file parsed, without `[search]` and `output.dir`; local folders and files are
renamed for the folder the new file lives in, so that it works from there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..recipe.load import Recipe
from ..recipe.reference import ModelRef

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["local_paths"]


def _renamed(path: Path, where: Path | None) -> str:
    """A local folder's name for a recipe in `where`: relative (./ or ../) when near, else absolute."""
    if where is None:
        return str(path)
    text = os.path.relpath(path, where)
    if Path(text).parts[:2] == ("..", ".."):  # far away: an absolute path says more
        return str(path)
    return text if text.startswith("..") else f"./{text}"


def local_paths(recipe: Recipe, where: Path | None) -> dict[str, Any]:
    """The recipe's TOML document without `[search]` and `output.dir`, its local folders and files renamed for
    a recipe file in the folder `where` (None: absolute paths)."""
    document: dict[str, Any] = tomllib.loads(recipe.text)
    document.pop("search", None)
    document.get("output", {}).pop("dir", None)
    refs: list[tuple[Any, str | int, ModelRef | None]] = [(document, "base", recipe.base)]
    refs += [(document["models"], i, m) for i, m in enumerate(recipe.models)]
    for holder, key, ref in refs:
        if ref is None or ref.path is None:
            continue
        if isinstance(holder[key], str):
            holder[key] = _renamed(ref.path, where)
        else:
            holder[key]["source"] = _renamed(ref.path, where)
    if recipe.tokenizer is not None and recipe.tokenizer.path is not None:
        document["tokenizer"]["source"] = _renamed(recipe.tokenizer.path, where)
    if recipe.card.template is not None:
        document["card"]["template"] = _renamed(recipe.card.template, where)
    if recipe.eval is not None and recipe.eval.include_path is not None:
        document["eval"]["include_path"] = _renamed(recipe.eval.include_path, where)
    return document
