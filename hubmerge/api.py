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

import torch

from .card import license_file, render_card
from .engine import write_weights
from .errors import HubmergeError, RecipeError
from .lock import LOCK_FILE, RECIPE_COPY, SourceHashes, apply_lock, check_reproduced, hash_sources, lock_data
from .output import check_target, disk_full, recover, staged, swap_in
from .plan import MergePlan, build_plan
from .publish import check_push_access
from .publish import push as publish
from .recipe import load_recipe
from .sources import TOKENIZER_FILES, fetch

__all__ = ["MergeResult", "load_plan", "merge"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class MergeResult:
    plan: MergePlan
    output_dir: Path
    files: tuple[str, ...]
    commit_url: str | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_plan(
    recipe_path: str | Path, output_dir: str | Path | None = None, lock: str | Path | None = None
) -> MergePlan:
    """Validate the recipe and resolve its sources (metadata only) into a `MergePlan`."""
    recipe = load_recipe(recipe_path, output_dir)
    template = recipe.card.template
    if template is not None and not template.is_relative_to(recipe.path.parent):
        # Rendered in pull-request checks and copied into the published output: it must be the recipe's own.
        raise RecipeError(
            f"{recipe.path}: card.template: {template} is outside the recipe's folder; keep the template "
            "beside the recipe or below it"
        )
    if lock is not None:
        recipe = apply_lock(recipe, Path(lock))
    return build_plan(recipe)


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


def _copy_side_files(plan: MergePlan, folders: dict[int, Path], directory: Path, log: Log) -> list[str]:
    config = dict(plan.config)
    if config.pop("auto_map", None) is not None:
        # auto_map makes transformers import Python files from the repo (trust_remote_code); hubmerge writes
        # a plain Qwen2 model, so the merged config must not point at code nobody reviewed.
        log(
            f"warning: {plan.config_source.label}: config.json has auto_map (remote code); left out of the output"
        )
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written = ["config.json"]
    tokenizer_folder = folders[id(plan.tokenizer)]
    # Tokenizer, chat template and generation_config.json all come from the tokenizer source and nowhere
    # else: mixing a base's generation config with an instruct chat template generates past <|im_end|>.
    for name in TOKENIZER_FILES:
        source_file = tokenizer_folder / name
        if source_file.is_file():
            shutil.copyfile(source_file, directory / name)
            written.append(name)
    (directory / RECIPE_COPY).write_text(plan.recipe.text)
    written.append(RECIPE_COPY)
    template = plan.recipe.card.template
    if template is not None:
        # The copied recipe names its template relative to itself: keep that path, so that the reproduce
        # command printed in the card works from the output folder (and from the pushed repo).
        relative = template.relative_to(plan.recipe.path.parent)
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, directory / relative)
        written.append(relative.as_posix())
    return written


def _side_bytes(plan: MergePlan, folders: dict[int, Path]) -> int:
    folder = folders[id(plan.tokenizer)]
    return sum((folder / n).stat().st_size for n in TOKENIZER_FILES if (folder / n).is_file())


def _no_space(exc: OSError, directory: Path, needed: int) -> HubmergeError:
    where = Path(exc.filename).parent if isinstance(exc.filename, str) else directory.absolute().parent
    return HubmergeError(
        f"no space left on the disk of {where} (the merged output needs {needed / 1e6:,.1f} MB there); "
        f"free some space or choose another --output; {directory} was left as it was"
    )


def merge(
    recipe_path: str | Path,
    *,
    output_dir: str | Path | None = None,
    push: bool = False,
    device: str = "cpu",
    lock: str | Path | None = None,
    quiet: bool = False,
    log: Log = _stderr,
) -> MergeResult:
    """Run a recipe end to end: write the output folder, and with `push=True` publish it to `[output] repo`.

    Publishing is explicit: without `push=True` nothing leaves the machine. With `lock`, the sources are
    pinned to the lock's commits and the output must equal the one it records. Raises a `HubmergeError`
    subclass with an actionable message; the previous output folder is replaced only by a complete new one.
    """
    merge_plan = load_plan(recipe_path, output_dir, lock)
    for warning in merge_plan.warnings:
        log(f"warning: {warning}")
    directory = merge_plan.recipe.output.dir
    recover(directory)
    check_target(directory, merge_plan.output_bytes)
    compute = _device(device)
    publishing = push and merge_plan.recipe.output.repo is not None
    if publishing:
        check_push_access(merge_plan)
    render_card(merge_plan)  # before any download: an unknown license or a broken template stops here

    needed = merge_plan.output_bytes
    source_hashes: SourceHashes | None = None
    try:
        folders = _fetch_all(merge_plan, quiet)
        needed += _side_bytes(merge_plan, folders)
        source_hashes = hash_sources(merge_plan, folders)
        with staged(directory) as staging:
            files = _write_output(merge_plan, folders, staging, compute, quiet, log)
            record = lock_data(merge_plan, folders, staging, files, source_hashes.result(), device)
            if lock is not None:
                check_reproduced(Path(lock), record)
            (staging / LOCK_FILE).write_text(json.dumps(record, indent=2) + "\n")
            files[LOCK_FILE] = None
            swap_in(staging, directory)
    except BaseException as exc:
        if source_hashes is not None:
            source_hashes.cancel()  # an error or Ctrl-C does not wait for gigabytes to be hashed
        full = disk_full(exc) if isinstance(exc, Exception) else None
        if full is not None:
            raise _no_space(full, directory, needed) from None
        raise
    result = MergeResult(merge_plan, directory, tuple(sorted(files)))
    if not publishing:
        return result
    pushed = publish(merge_plan, directory)
    if not pushed.changed:
        log(f"{merge_plan.recipe.output.repo} already holds exactly this output; no new commit was made")
    return MergeResult(merge_plan, directory, result.files, pushed.url)


def _write_output(
    plan: MergePlan, folders: dict[int, Path], staging: Path, compute: torch.device, quiet: bool, log: Log
) -> dict[str, str | None]:
    """Write weights, side files, card and license into `staging`; each file name maps to its known sha256."""
    from tqdm.auto import tqdm

    with tqdm(
        total=plan.output_bytes,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=quiet or not sys.stderr.isatty(),
    ) as bar:
        files = write_weights(plan, folders, staging, compute, bar.update)
    files |= dict.fromkeys(_copy_side_files(plan, folders, staging, log))
    # Rendered again now that the tokenizer files are local: the chat template may live in them.
    (staging / "README.md").write_text(render_card(plan), encoding="utf-8")
    files["README.md"] = None
    governing = license_file(plan)
    if governing is not None:
        source, name = governing
        shutil.copyfile(folders[id(source)] / name, staging / name)
        files[name] = None
    return files
