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
from .mergekit_config import import_mergekit
from .recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from .api import InspectResult, MergeResult, inspect, load_plan, merge


def __getattr__(name: str) -> Any:
    # The merge API imports torch; keep `import hubmerge` (and `hubmerge validate`) fast without it.
    if name in ("InspectResult", "MergeResult", "inspect", "load_plan", "merge"):
        from . import api

        return getattr(api, name)
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
