"""The library API behind the CLI: recipe → plan → fetch → merge → card → publish.

>>> import hubmerge
>>> result = hubmerge.merge("recipes/examples/tiny-ties.toml")
>>> result.output_dir
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .card import license_file, render_card
from .diagnostics import MergeStats, stats_files, write_stats
from .engine import collect_stats, write_weights
from .errors import HubmergeError
from .lock import LOCK_FILE, RECIPE_COPY, apply_lock, hash_sources, lock_data
from .plan import MergePlan, build_plan
from .publish import check_push_access
from .publish import push as publish
from .recipe import load_recipe
from .sources import TOKENIZER_FILES, fetch

__all__ = ["InspectResult", "MergeResult", "inspect", "load_plan", "merge"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class MergeResult:
    plan: MergePlan
    output_dir: Path
    files: tuple[str, ...]
    commit_url: str | None = None
    stats: dict[str, Any] | None = None  # merge_stats.json, when the diagnostics were collected


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_plan(
    recipe_path: str | Path, output_dir: str | Path | None = None, lock: str | Path | None = None
) -> MergePlan:
    """Validate the recipe and resolve its sources (metadata only) into a `MergePlan`."""
    recipe = load_recipe(recipe_path, output_dir)
    if lock is not None:
        recipe = apply_lock(recipe, Path(lock))
    return build_plan(recipe)


def _check_output_dir(plan: MergePlan) -> None:
    directory = plan.recipe.output.dir
    if directory.exists() and any(directory.iterdir()) and not (directory / RECIPE_COPY).is_file():
        raise HubmergeError(
            f"{directory} exists and is not a hubmerge output; choose another [output] dir or --output, or remove it"
        )
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(existing).free
    if free < plan.output_bytes:
        raise HubmergeError(
            f"{existing} has {free / 1e9:.1f} GB free but the merged weights need {plan.output_bytes / 1e9:.1f} GB; "
            "free some space or choose another --output"
        )


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise HubmergeError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    return torch.device(name)


def _fetch_all(plan: MergePlan, quiet: bool) -> dict[int, Path]:
    folders: dict[int, Path] = {}
    for source in (*plan.weight_sources, plan.tokenizer):
        if id(source) not in folders:
            folders[id(source)] = fetch(
                source, weights=bool(source.tensors), tokenizer=source is plan.tokenizer, quiet=quiet
            )
    return folders


def _copy_side_files(plan: MergePlan, folders: dict[int, Path], directory: Path) -> list[str]:
    (directory / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    written = ["config.json"]
    tokenizer_folder = folders[id(plan.tokenizer)]
    for name in TOKENIZER_FILES:
        source_file = tokenizer_folder / name
        if not source_file.is_file() and name == "generation_config.json":
            source_file = folders[id(plan.config_source)] / name
        if source_file.is_file():
            shutil.copyfile(source_file, directory / name)
            written.append(name)
    (directory / RECIPE_COPY).write_text(plan.recipe.text)
    return [*written, RECIPE_COPY]


def _replace(directory: Path, staging: Path) -> None:
    """Move the finished staging folder into place; a previous hubmerge output there is replaced."""
    old = directory.with_name(f".{directory.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def merge(
    recipe_path: str | Path,
    *,
    output_dir: str | Path | None = None,
    push: bool = True,
    device: str = "cpu",
    lock: str | Path | None = None,
    quiet: bool = False,
    stats: bool = True,
    log: Log = _stderr,
) -> MergeResult:
    """Run a recipe end to end. Raises a `HubmergeError` subclass with an actionable message.

    `stats=False` (or `[output] stats = false`) skips the merge diagnostics (merge_stats.json and plots).
    """
    merge_plan = load_plan(recipe_path, output_dir, lock)
    for warning in merge_plan.warnings:
        log(f"warning: {warning}")
    directory = merge_plan.recipe.output.dir
    _check_output_dir(merge_plan)
    compute = _device(device)
    publishing = push and merge_plan.recipe.output.repo is not None
    if publishing:
        check_push_access(merge_plan)
    render_card(merge_plan)  # before any download: an unknown license or a broken template stops here

    folders = _fetch_all(merge_plan, quiet)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    source_hashes = hash_sources(merge_plan, folders)
    collector = MergeStats(merge_plan) if stats and merge_plan.stats else None
    document = None
    try:
        from tqdm.auto import tqdm

        with tqdm(
            total=merge_plan.output_bytes,
            unit="B",
            unit_scale=True,
            desc="merging",
            disable=quiet or not sys.stderr.isatty(),
        ) as bar:
            files = write_weights(merge_plan, folders, staging, compute, bar.update, collector)
        files |= dict.fromkeys(_copy_side_files(merge_plan, folders, staging))
        if collector is not None:
            document = write_stats(collector.result(), staging)
            files |= dict.fromkeys(stats_files(document))
        # Rendered again now that the tokenizer files are local: the chat template may live in them.
        (staging / "README.md").write_text(render_card(merge_plan, stats=document), encoding="utf-8")
        files["README.md"] = None
        governing = license_file(merge_plan)
        if governing is not None:
            source, name = governing
            shutil.copyfile(folders[id(source)] / name, staging / name)
            files[name] = None
        record = lock_data(merge_plan, folders, staging, files, source_hashes.result())
        (staging / LOCK_FILE).write_text(json.dumps(record, indent=2) + "\n")
        files[LOCK_FILE] = None
        _replace(directory, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = MergeResult(merge_plan, directory, tuple(sorted(files)), stats=document)
    if not publishing:
        return result
    pushed = publish(merge_plan, directory)
    if not pushed.changed:
        log(f"{merge_plan.recipe.output.repo} already holds exactly this output; no new commit was made")
    return MergeResult(merge_plan, directory, result.files, pushed.url, document)


@dataclass(frozen=True)
class InspectResult:
    plan: MergePlan
    output_dir: Path
    files: tuple[str, ...]
    stats: dict[str, Any]


def inspect(
    recipe_path: str | Path,
    *,
    output_dir: str | Path | None = None,
    device: str = "cpu",
    lock: str | Path | None = None,
    quiet: bool = False,
) -> InspectResult:
    """Compute a recipe's merge diagnostics without merging: the same reads and statistics as `merge`, in
    one streaming pass (two for TIES, as the merge), writing only merge_stats.json and its plots.

    The folder defaults to the recipe's output folder with "-inspect" appended, beside it, so a later
    merge into the output folder finds nothing there that it did not write.
    """
    merge_plan = load_plan(recipe_path, lock=lock)
    out = merge_plan.recipe.output.dir
    directory = (
        Path(output_dir).expanduser().resolve() if output_dir else out.with_name(out.name + "-inspect")
    )
    compute = _device(device)
    folders = _fetch_all(merge_plan, quiet)
    document = collect_stats(merge_plan, folders, compute).result()
    directory.mkdir(parents=True, exist_ok=True)
    document = write_stats(document, directory)
    return InspectResult(merge_plan, directory, tuple(stats_files(document)), document)
