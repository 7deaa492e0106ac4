"""`hubmerge search --publish best`: merge best.toml and push it as a plain merge does, its card carrying a
section on the search that found the values (`SearchCard`, the card template's `search`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HubmergeError, RecipeError
from ..recipe.load import load_recipe
from .space import Dimension, SearchSpec

if TYPE_CHECKING:
    from ..api import MergeResult
    from .run import SearchResult

__all__ = ["TOP_TRIALS", "SearchCard", "check_publishable", "publish_best", "search_card"]

TOP_TRIALS = 5  # rows of the card's table of trials


@dataclass(frozen=True)
class SearchCard:
    """What a card says about the search that found its recipe's values."""

    sampler: str
    seed: int | None
    states: Mapping[str, int]  # finished trials by state: complete, failed, pruned
    objective: Mapping[str, float]  # term → weight
    direction: str  # "minimize" / "maximize"
    space: tuple[tuple[str, str], ...]  # (recipe path, what its values were drawn from)
    best: Mapping[str, Any]  # the best trial's record (search_results.json)
    as_written: Mapping[str, Any] | None  # the trial of the recipe's own values, when it was tried
    top: tuple[Mapping[str, Any], ...]  # the best complete trials, best first, at most TOP_TRIALS


def _drawn_from(d: Dimension) -> str:
    if d.choices:
        what = "one of " + ", ".join(repr(c) for c in d.choices)
    else:
        what = (
            f"{d.low!r} to {d.high!r}"
            + (f", step {d.step!r}" if d.step else "")
            + (", log scale" if d.log else "")
        )
    if d.layers_per_group is not None:
        filters = f" and filter ({', '.join(d.filters)})" if d.filters else ""
        what += f", one value per group of {d.layers_per_group} layers{filters}"
    return what


def search_card(result: SearchResult, spec: SearchSpec) -> SearchCard:
    """The card's view of a finished search."""
    if result.best is None:
        raise HubmergeError(f"no trial completed; nothing to publish (see {result.output_dir})")
    finished = [t for t in result.trials if t["state"] != "running"]
    complete = [t for t in finished if t["state"] == "complete"]
    ranked = sorted(complete, key=lambda t: t["score"], reverse=result.direction == "maximize")
    return SearchCard(
        sampler=spec.sampler,
        seed=spec.seed,
        states={s: sum(t["state"] == s for t in finished) for s in ("complete", "failed", "pruned")},
        objective=dict(spec.objective),
        direction=result.direction,
        space=tuple((d.path, _drawn_from(d)) for d in spec.dimensions),
        best=result.best,
        as_written=next((t for t in complete if t["as_written"]), None),
        top=tuple(ranked[:TOP_TRIALS]),
    )


def check_publishable(recipe_path: str | Path) -> None:
    """Before any trial: `--publish best` needs `[output] repo` and a token that can write there."""
    from .. import api
    from ..publish.hub import check_push_access

    recipe = load_recipe(recipe_path)
    if recipe.output.repo is None:
        raise RecipeError(
            f'{recipe_path}: --publish best pushes to [output] repo; set it (repo = "user/name") or drop --publish'
        )
    check_push_access(api.load_plan(recipe))


def publish_best(result: SearchResult, spec: SearchSpec, log: Any) -> MergeResult:
    """Merge `best.toml` into its `best/` folder and push it to `[output] repo`, the card with a search section."""
    from .. import api

    card = search_card(result, spec)
    assert result.best_recipe is not None  # search_card: a trial completed
    recipe = load_recipe(result.best_recipe)
    recipe = dataclasses.replace(recipe, search_card=card)
    return api.merge(recipe, push=True, log=log)
