"""hubmerge: merge Qwen2.5 checkpoints from a TOML recipe and publish the result to the Hugging Face Hub.

The pipeline runs one way: recipe → plan → fetch → merge → card → publish.

    >>> import hubmerge
    >>> hubmerge.merge("recipes/examples/tiny-ties.toml", push=False).output_dir
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .errors import (
    CardError,
    ConfigImportError,
    HubmergeError,
    IncompatibleSourcesError,
    PublishError,
    RecipeError,
    SourceError,
)

if TYPE_CHECKING:
    from .api import InspectResult, MergeResult, inspect, load_plan, merge
    from .interop.mergekit import import_mergekit
    from .recipe.load import Recipe, load_recipe

# Loaded on first use (PEP 562): the merge API imports torch, the recipe model pydantic, and the mergekit
# importer both, so `import hubmerge` and `hubmerge --version` stay fast without them.
_LAZY = {
    "InspectResult": "api",
    "MergeResult": "api",
    "inspect": "api",
    "load_plan": "api",
    "merge": "api",
    "import_mergekit": "interop.mergekit",
    "Recipe": "recipe.load",
    "load_recipe": "recipe.load",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hubmerge' has no attribute {name!r}")


__all__ = [
    "CardError",
    "ConfigImportError",
    "HubmergeError",
    "IncompatibleSourcesError",
    "InspectResult",
    "MergeResult",
    "PublishError",
    "Recipe",
    "RecipeError",
    "SourceError",
    "__version__",
    "import_mergekit",
    "inspect",
    "load_plan",
    "load_recipe",
    "merge",
]
