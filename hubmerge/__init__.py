"""hubmerge: merge Qwen2.5 checkpoints from a TOML recipe and publish the result to the Hugging Face Hub.

The pipeline runs one way: recipe → plan → fetch → merge → card → publish.

    >>> import hubmerge
    >>> hubmerge.merge("recipes/examples/tiny-ties.toml", push=False).output_dir
"""

__version__ = "0.1.0"

from .api import MergeResult, merge, plan  # noqa: E402
from .errors import (  # noqa: E402
    CardError,
    HubmergeError,
    IncompatibleSourcesError,
    PublishError,
    RecipeError,
    SourceError,
)
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "CardError",
    "HubmergeError",
    "IncompatibleSourcesError",
    "MergeResult",
    "PublishError",
    "Recipe",
    "RecipeError",
    "SourceError",
    "__version__",
    "load_recipe",
    "merge",
    "plan",
]
