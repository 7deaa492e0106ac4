"""The library API behind the CLI: recipe → plan → fetch → merge → card → publish.

>>> import hubmerge
>>> result = hubmerge.merge("recipes/examples/tiny-ties.toml")
>>> result.output_dir
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import itertools
import json
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import Cancelled, EvalError, GateError, HubmergeError, RecipeError
from .gguf import card_license, companion_staging, open_stream, write_companion, write_companion_files
from .gguf import write_files as write_gguf_files
from .merging.engine import collect_stats, write_weights
from .merging.plan import MergePlan, build_plan
from .publish.card import license_file, render_card
from .publish.files import CARD_FILE, CONFIG_FILE, LOCK_FILE, RECIPE_COPY, STATS_FILE
from .publish.hub import ShardUploader, check_push_access, push_companion
from .publish.hub import push as publish
from .publish.lock import (
    KnownHashes,
    SourceHashes,
    Verification,
    apply_lock,
    check_reproduced,
    file_sha256,
    hash_sources,
    lock_data,
    verify_cached,
)
from .publish.output import check_target, disk_full, recover, staged, swap_in
from .quality import kernel
from .quality.diagnostics import MergeStats, stats_files, write_stats
from .quality.evaluate import (
    CHART_FILE,
    RESULTS_FILE,
    Candidate,
    Evaluation,
    evaluate_models,
    require_lm_eval,
    summary_markdown,
)
from .quality.sanity import SanityReport
from .recipe.load import Recipe, load_recipe, loads_recipe
from .recipe.schema import EvalTable
from .sources.checkpoint import Folder, numel
from .sources.remote import RemoteFolder, prove_all
from .sources.resolve import TOKENIZER_FILES, Source, fetch

if TYPE_CHECKING:
    from .gguf.writer import GgufStream

__all__ = [
    "EvalResult",
    "InspectResult",
    "MergeProgress",
    "MergeResult",
    "evaluate",
    "inspect",
    "load_plan",
    "merge",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class MergeProgress:
    """Where a merge stands, as `merge(progress=...)` is told after each merged slice is written."""

    written: int  # bytes of merged weights written so far
    total: int  # bytes the merged weights total
    tensors_done: int  # output tensors written whole (the engine writes them in shard order)
    tensors: int  # output tensors in all
    fetched: int | None  # bytes streamed in from the Hub so far; None when no source is streamed
    uploaded: int | None  # bytes uploaded while merging; None when the shards are not uploaded as written


Progress = Callable[[MergeProgress], None]


@dataclass(frozen=True)
class MergeResult:
    plan: MergePlan
    output_dir: Path
    files: tuple[str, ...]
    commit_url: str | None = None
    stats: dict[str, Any] | None = None  # merge_stats.json, when the diagnostics were collected
    evaluation: Evaluation | None = None  # lm-eval results, with `evaluate=True`
    sanity: SanityReport | None = None  # the quick sanity check, unless turned off


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_plan(
    recipe_path: str | Path | Recipe,
    output_dir: str | Path | None = None,
    lock: str | Path | None = None,
    max_disk: int | None = None,
    delete_uploaded: bool = False,
) -> MergePlan:
    """Validate the recipe and resolve its sources (metadata only) into a `MergePlan`.

    `max_disk` (bytes) overrides `[output] max_disk`, the disk budget (budget.py). `delete_uploaded`: plan
    for each shard being deleted once uploaded (`merge`). A `Recipe` already loaded (`loads_recipe`, for a
    recipe that is text rather than a file) stands for its file.
    """
    if isinstance(recipe_path, Recipe):
        recipe = recipe_path
        if output_dir is not None:
            recipe = loads_recipe(recipe.text, recipe.path, output_dir)
    else:
        recipe = load_recipe(recipe_path, output_dir)
    if max_disk is not None:
        recipe = dataclasses.replace(recipe, output=recipe.output.model_copy(update={"max_disk": max_disk}))
    if lock is not None:
        recipe = apply_lock(recipe, Path(lock))
    return build_plan(recipe, delete_uploaded=delete_uploaded)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise HubmergeError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    return torch.device(name)


def _streamed(plan: MergePlan) -> dict[str, Source]:
    """The sources whose weights the disk plan reads by range from the Hub, by `Source.key`."""
    return {r.source.key: r.source for r in plan.roles if r.name in plan.disk.streamed}


def _fetch_all(
    plan: MergePlan, quiet: bool, stream: bool = True, cancel: threading.Event | None = None
) -> dict[str, Path]:
    """Each source's folder; with `stream`, the streamed sources' folders hold everything but the weights.
    A `cancel` set while one source downloads stops before the next one."""
    streamed = _streamed(plan) if stream else {}
    folders: dict[str, Path] = {}
    for source in (*plan.weight_sources, plan.tokenizer):
        _check_cancel(cancel)
        if source.key not in folders:
            folders[source.key] = fetch(
                source,
                weights=bool(source.tensors),
                tokenizer=source is plan.tokenizer,
                quiet=quiet,
                stream=source.key in streamed,
            )
    return folders


@contextlib.contextmanager
def _weights(
    plan: MergePlan, folders: dict[str, Path]
) -> Iterator[tuple[dict[str, Folder], dict[str, RemoteFolder]]]:
    """Where the engine reads each source's weights: its folder, or the Hub by range (streamed sources)."""
    verify = plan.recipe.output.verify_streamed
    remote = {key: RemoteFolder(source, verify=verify) for key, source in _streamed(plan).items()}
    try:
        yield {**folders, **remote}, remote
    finally:
        for folder in remote.values():
            folder.close()


def _copy_side_files(plan: MergePlan, folders: dict[str, Path], directory: Path, log: Log) -> list[str]:
    config = dict(plan.config)
    if config.pop("auto_map", None) is not None:
        # auto_map makes transformers import Python files from the repo (trust_remote_code); hubmerge writes
        # a plain Qwen2 model, so the merged config must not point at code nobody reviewed.
        log(
            f"warning: {plan.config_source.label}: config.json has auto_map (remote code); left out of the output"
        )
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written = [CONFIG_FILE]
    tokenizer_folder = folders[plan.tokenizer.key]
    # Tokenizer, chat template and generation_config.json all come from the tokenizer source and nowhere
    # else: mixing a base's generation config with an instruct chat template generates past <|im_end|>.
    for name in TOKENIZER_FILES:
        source_file = tokenizer_folder / name
        if source_file.is_file():
            shutil.copyfile(source_file, directory / name)
            written.append(name)
    (directory / RECIPE_COPY).write_text(plan.recipe.published_text)
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


def _side_bytes(plan: MergePlan, folders: dict[str, Path]) -> int:
    folder = folders[plan.tokenizer.key]
    return sum((folder / n).stat().st_size for n in TOKENIZER_FILES if (folder / n).is_file())


def _no_space(exc: OSError, directory: Path, needed: int) -> HubmergeError:
    where = Path(exc.filename).parent if isinstance(exc.filename, str) else directory.absolute().parent
    return HubmergeError(
        f"no space left on the disk of {where} (the merged output needs {needed / 1e6:,.1f} MB there); "
        f"free some space or choose another --output; {directory} was left as it was"
    )


def merge(
    recipe_path: str | Path | Recipe,
    *,
    output_dir: str | Path | None = None,
    push: bool = False,
    device: str = "cpu",
    lock: str | Path | None = None,
    quiet: bool = False,
    stats: bool = True,
    evaluate: bool = False,
    sanity: bool = True,
    upload_while_merging: bool = True,
    delete_uploaded: bool = False,
    max_disk: int | None = None,
    log: Log = _stderr,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> MergeResult:
    """Run a recipe end to end: write the output folder, and with `push=True` publish it to `[output] repo`.

    Publishing is explicit: without `push=True` nothing leaves the machine. With `lock`, the sources are
    pinned to the lock's commits and the output must equal the one it records. Raises a `HubmergeError`
    subclass with an actionable message; the previous output folder is replaced only by a complete new one.

    `stats=False` (or `[output] stats = false`) skips the merge diagnostics (merge_stats.json and plots).
    `evaluate=True` runs the recipe's `[eval]` tasks on the merge (and its sources) before publishing; a merge
    that misses `[eval] require` is written but not pushed (`GateError`). `sanity=False` (or `[eval] sanity =
    false`) skips the quick sanity check (sanity.py). `max_disk` (bytes) overrides `[output] max_disk`: the
    plan (budget.py) streams sources from the Hub and sizes shards so that the run fits it.

    When pushing (without `evaluate`, whose gate comes first), `upload_while_merging` uploads each shard as
    soon as it is written, while the merge goes on; the one commit is made once the whole output is uploaded
    (`publish.ShardUploader`). `delete_uploaded` then deletes each shard from the output folder once it is on
    the Hub, so that at most two shards are on the disk at a time (a method that would rewrite closed shards
    at the end then reads its inputs once more before the merge to settle that up front, `Deferral.settle`);
    the folder keeps the side files and the lock, and no sanity check runs (it reads the whole model).

    `progress(MergeProgress)` is called after each merged slice is written (bytes and tensors written, bytes
    streamed in and uploaded). Setting
    `cancel` (from another thread) stops the merge at the next slice, or before the output replaces anything,
    with `Cancelled`: the staging folder is removed, the previous output is left as it was, nothing is pushed.
    """
    merge_plan = load_plan(recipe_path, output_dir, lock, max_disk, delete_uploaded and push)
    spec = _eval_spec(merge_plan) if evaluate else None
    if spec is not None:
        require_lm_eval()  # before any download: a missing extra fails in a second
    for warning in merge_plan.warnings:
        log(f"warning: {warning}")
    directory = merge_plan.recipe.output.dir
    recover(directory)
    # With shards deleted as they are uploaded, the folder holds two at once: one written, one uploading.
    at_once = sum(sorted(s.nbytes for s in merge_plan.shards)[-2:])
    check_target(directory, at_once if merge_plan.disk.upload_while_merging else merge_plan.output_bytes)
    compute = _device(device)
    publishing = push and merge_plan.recipe.output.repo is not None
    if merge_plan.disk.upload_while_merging and not publishing:
        raise HubmergeError(
            f"the merged output ({merge_plan.output_bytes / 1e9:.2f} GB) does not fit the disk budget "
            f"({merge_plan.disk.budget / 1e9:.2f} GB, {merge_plan.disk.budget_origin}) without being uploaded as "
            "it is written; push it (drop --no-push), raise --max-disk, or free some space"
        )
    if merge_plan.disk.upload_while_merging:  # the budget holds a few shards, not the model: delete them
        delete_uploaded = True
    if delete_uploaded and spec is not None:
        raise HubmergeError(
            "an evaluation reads the whole merged model from the disk, which delete_uploaded does not keep; "
            "evaluate without delete_uploaded, or afterwards from the pushed repo"
        )
    # An [eval] gate decides whether anything leaves the machine: nothing is uploaded before it passes.
    streaming = publishing and upload_while_merging and spec is None
    if delete_uploaded and not streaming:
        raise HubmergeError(
            "delete_uploaded deletes shards once they are uploaded, so it needs a push with "
            "upload_while_merging; without a push the output folder must hold the whole model"
        )
    if delete_uploaded and sanity and merge_plan.recipe.sanity:
        log(
            "warning: the sanity check reads the whole merged model, which delete_uploaded does not keep: skipped"
        )
        sanity = False
    if publishing:
        check_push_access(merge_plan)
    render_card(merge_plan)  # before any download: an unknown license or a broken template stops here

    needed = merge_plan.output_bytes
    source_hashes: SourceHashes | None = None
    collector = MergeStats(merge_plan) if stats and merge_plan.stats else None
    uploader: ShardUploader | None = None
    out = merge_plan.recipe.output
    gguf_beside = out.gguf_dir == out.dir
    # The shards are deleted once uploaded, so the merged model is never whole on the disk: the GGUF files
    # are written shard by shard as the merge goes, then uploaded (and deleted) one by one.
    stream_gguf = bool(out.gguf) and delete_uploaded
    gguf_stream: GgufStream | None = None
    gguf_uploader: ShardUploader | None = None
    try:
        folders = _fetch_all(merge_plan, quiet, cancel=cancel)
        _check_cancel(cancel)
        if streaming:
            uploader = ShardUploader(merge_plan, delete_uploaded=delete_uploaded)
        needed += _side_bytes(merge_plan, folders)
        source_hashes = hash_sources(merge_plan, folders)
        companion = companion_staging(merge_plan) if stream_gguf and not gguf_beside else None
        with (
            staged(directory) as staging,
            _weights(merge_plan, folders) as (weights, remote),
            companion or contextlib.nullcontext() as gguf_staging,
        ):
            if stream_gguf:
                gguf_folder = staging if gguf_staging is None else gguf_staging
                gguf_stream = open_stream(merge_plan, folders[merge_plan.tokenizer.key], gguf_folder)
            written = _write_output(
                merge_plan,
                folders,
                weights,
                staging,
                compute,
                quiet,
                log,
                collector,
                spec,
                sanity and merge_plan.recipe.sanity,
                uploader,
                tuple(remote.values()),
                _Watch(progress, cancel),
                gguf_stream,
            )
            files = written.files
            prove_all(remote.values())  # every streamed byte proven the Hub's before anything is kept or pushed
            if gguf_stream is not None:
                assert uploader is not None
                gguf_files = gguf_stream.finish()
                if gguf_staging is not None:
                    gguf_uploader = ShardUploader(merge_plan, delete_uploaded=True, companion=True)
                for gguf_file in gguf_files:  # uploaded and deleted one by one, as the shards were
                    (gguf_uploader or uploader).submit(gguf_file.path)
                if gguf_uploader is not None and gguf_staging is not None:
                    gguf_uploader.wait()
                    gone_gguf = gguf_uploader.deleted()
                    license = card_license(staging)
                    write_companion_files(merge_plan, gguf_staging, gguf_files, license, gone_gguf)
            elif out.gguf and gguf_beside:  # in the same commit as the weights
                files |= {f.path.name: None for f in write_gguf_files(merge_plan, staging, staging)}
            if uploader is not None and delete_uploaded:
                uploader.wait()  # a shard rewritten after the last one may be going up again, to be deleted after
            gone = uploader.deleted() if uploader is not None else {}
            files |= {name: sha for name, (_, sha) in gone.items()}
            uploaded = {name: size for name, (size, _) in gone.items()}
            hashes = source_hashes.result()
            verify_cached(merge_plan, folders, hashes)  # before the output replaces anything
            record = lock_data(
                merge_plan, folders, staging, files, hashes, device, uploaded, _verified(merge_plan, remote)
            )
            if lock is not None:
                check_reproduced(Path(lock), record)
            (staging / LOCK_FILE).write_text(json.dumps(record, indent=2) + "\n")
            files[LOCK_FILE] = None
            if uploader is not None:
                uploader.wait()  # the shards still uploading are read from the staging folder
            _check_cancel(cancel)  # the last moment: after the swap the new output is complete
            swap_in(staging, directory)
            if gguf_staging is not None:
                swap_in(gguf_staging, out.gguf_dir)
    except BaseException as exc:
        if source_hashes is not None:
            source_hashes.cancel()  # an error or Ctrl-C does not wait for gigabytes to be hashed
        if gguf_stream is not None:
            gguf_stream.abort()
        for running in (uploader, gguf_uploader):
            if running is not None:
                running.cancel()  # nothing is committed
        full = disk_full(exc) if isinstance(exc, Exception) else None
        if full is not None:
            raise _no_space(full, directory, needed) from None
        raise
    if out.gguf and not gguf_beside and not stream_gguf:
        write_companion(merge_plan, directory)
    document, evaluation, report = written.stats, written.evaluation, written.sanity
    result = MergeResult(merge_plan, directory, tuple(sorted(files)), None, document, evaluation, report)
    if evaluation is not None:
        where = f"it is in {directory} but was not pushed" if publishing else f"the output is in {directory}"
        _gate(evaluation, where)
    if not publishing:
        return result
    if uploader is not None:
        pushed = uploader.finish(directory)
        if not quiet:
            log(f"uploaded the shards while merging: {uploader.status()}")
    else:
        pushed = publish(merge_plan, directory)
    if not pushed.changed:
        log(f"{merge_plan.recipe.output.repo} already holds exactly this output; no new commit was made")
    if gguf_uploader is not None:
        companion_pushed = gguf_uploader.finish(out.gguf_dir)
    elif out.gguf and not gguf_beside:
        companion_pushed = push_companion(merge_plan, out.gguf_dir)
    if out.gguf and not gguf_beside and not quiet:
        log(f"GGUF files: {companion_pushed.url}")
    return MergeResult(merge_plan, directory, result.files, pushed.url, document, evaluation, report)


def _verified(plan: MergePlan, remote: dict[str, RemoteFolder]) -> dict[str, Verification]:
    """How each Hub source's weights were checked, by first mention: the cached ones by their sha256 (see
    `verify_cached`), the streamed ones as `remote.verification` says."""
    result: dict[str, Verification] = {}
    for role in plan.roles:
        source = role.source
        if source.ref.is_local or not source.tensors:
            continue
        folder = remote.get(source.key)
        result[role.name] = folder.verification() if folder is not None else "sha256"
    return result


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the merge was cancelled; the previous output, if any, was left as it was")


@dataclass(frozen=True)
class _Watch:
    """The caller's view of a merge in progress: a progress callback and a cancel event, both optional."""

    progress: Progress | None = None
    cancel: threading.Event | None = None


@dataclass(frozen=True)
class _Written:
    """What `_write_output` put into the staging folder."""

    files: dict[str, str | None]  # file name -> sha256 where already known
    stats: dict[str, Any] | None
    evaluation: Evaluation | None
    sanity: SanityReport | None


def _write_output(
    plan: MergePlan,
    folders: dict[str, Path],
    weights: dict[str, Folder],
    staging: Path,
    compute: torch.device,
    quiet: bool,
    log: Log,
    collector: MergeStats | None,
    spec: EvalTable | None,
    sanity: bool,
    uploader: ShardUploader | None = None,
    streamed: Sequence[RemoteFolder] = (),
    watch: _Watch = _Watch(),
    gguf: GgufStream | None = None,
) -> _Written:
    """Write weights, side files, diagnostics, checks, card and license into `staging`; hand each shard to
    `gguf` (its tensors appended to the GGUF files) and then to `uploader` as soon as it is complete. The
    progress bar shows the bytes `streamed` in and uploaded out."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    done = 0
    # Where each output tensor's bytes end in the order the engine writes them: tensors done by bytes done.
    ends = list(
        itertools.accumulate(
            numel(shape) * torch.empty(0, dtype=layout.dtype).element_size()
            for layout in plan.shards
            for _, shape in layout.tensors
        )
    )

    with tqdm(
        total=plan.output_bytes,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=quiet or not sys.stderr.isatty(),
    ) as bar:

        def progress(written: int) -> None:
            nonlocal done
            _check_cancel(watch.cancel)
            done += written
            fetched = sum(folder.fetched for folder in streamed) if streamed else None
            if watch.progress is not None:
                watch.progress(
                    MergeProgress(
                        done,
                        plan.output_bytes,
                        bisect.bisect_right(ends, done),
                        len(ends),
                        fetched,
                        uploader.bytes_out if uploader is not None else None,
                    )
                )
            bar.update(written)
            transfers = []
            if fetched is not None:
                transfers.append(_incoming_status(fetched, time.monotonic() - started))
            if uploader is not None:
                transfers.append(uploader.status())
            if transfers:
                bar.set_postfix_str(", ".join(transfers), refresh=False)

        on_shard = None
        rewrites = plan.rewrites_shards
        if uploader is not None:
            on_shard = _rewriting_upload(plan, uploader) if rewrites else uploader.submit
        if gguf is not None:  # only where the shards are deleted once uploaded: never rewritten
            assert not rewrites
            on_shard = _gguf_then(gguf, on_shard)
        files = write_weights(plan, weights, staging, compute, progress, collector, on_shard)
        if uploader is not None and rewrites:
            for layout in plan.shards:
                if files[layout.file] is None or layout is plan.shards[-1]:
                    uploader.submit(staging / layout.file)  # rewritten by the patch, or held back for it
                else:
                    uploader.release(staging / layout.file)
    files |= dict.fromkeys(_copy_side_files(plan, folders, staging, log))
    document = None
    if collector is not None:
        document = write_stats(collector.result(), staging)
        files |= dict.fromkeys(stats_files(document))
        if document.get("plots_note"):  # a local install's missing extra: said here, never in the card
            log(document["plots_note"])
        if compute.type == "cpu" and not kernel.available():
            log(kernel.MISSING)
    candidates = _source_candidates(plan, folders)
    if sanity:
        _return_freed_memory()
    report = _sanity_check(plan, staging, weights, compute, log) if sanity else None
    evaluation = None
    if spec is not None:
        evaluation = _evaluate(plan, spec, staging, candidates if spec.sources else [], log)
    if report is not None or evaluation is not None:
        files |= dict.fromkeys(_write_results(staging, evaluation, report))
    # Rendered again now that the tokenizer files are local: the chat template may live in them.
    card = render_card(plan, stats=document, evaluation=evaluation, sanity=report)
    (staging / CARD_FILE).write_text(card, encoding="utf-8")
    files[CARD_FILE] = None
    governing = license_file(plan)
    if governing is not None:
        source, name = governing
        shutil.copyfile(folders[source.key] / name, staging / name)
        files[name] = None
    return _Written(files, document, evaluation, report)


def _incoming_status(fetched: int, seconds: float) -> str:
    """Bytes streamed in from the Hub and their throughput, for the progress bar."""
    rate = fetched / seconds / 1e6 if seconds > 0 else 0.0
    return f"in {fetched / 1e6:,.1f} MB at {rate:,.1f} MB/s"


def _gguf_then(gguf: GgufStream, on_shard: Callable[[Path], None] | None) -> Callable[[Path], None]:
    """The shard hook that appends each finished shard's tensors to the GGUF files before `on_shard`
    (which may upload and delete the shard)."""

    def hook(path: Path) -> None:
        gguf.add_shard(path)
        if on_shard is not None:
            on_shard(path)

    return hook


def _rewriting_upload(plan: MergePlan, uploader: ShardUploader) -> Callable[[Path], None]:
    """The shard hook for a method that may rewrite closed shards once the whole model is merged (the
    positions it left open, `methods.Deferred`, patched right after the last shard by `engine._Patches`;
    `MergePlan.rewrites_shards`): each shard but the last is uploaded as soon as it is closed and kept; the
    last one waits until no upload reads a shard while the patch may write it. What the patch rewrites goes
    up again afterwards (`_write_output`). A plan that deletes uploaded shards settles them first instead
    (`Deferral.settle`), and uploads with the plain hook."""
    last = plan.shards[-1].file

    def on_shard(path: Path) -> None:
        if path.name == last:
            uploader.wait()
        else:
            uploader.submit(path, keep=True)

    return on_shard


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
    one streaming pass (more for a method with passes, as the merge), writing only merge_stats.json and its plots.

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
    with _weights(merge_plan, folders) as (weights, remote):
        document = collect_stats(merge_plan, weights, compute).result()
        prove_all(remote.values())
    directory.mkdir(parents=True, exist_ok=True)
    document = write_stats(document, directory)
    return InspectResult(merge_plan, directory, tuple(stats_files(document)), document)


# --- evaluation ----------------------------------------------------------------------------------------------


def _eval_spec(plan: MergePlan) -> EvalTable:
    if plan.recipe.eval is None:
        raise RecipeError(
            f'{plan.recipe.path}: evaluating needs an [eval] table with tasks, e.g. tasks = ["gsm8k"], limit = 100'
        )
    return plan.recipe.eval


def _source_candidates(plan: MergePlan, folders: dict[str, Path]) -> list[Candidate]:
    """The base (when the recipe has one) and every model, in recipe order, as the recipe names them; a
    source mentioned twice is one candidate (its first mention), evaluated once. Streamed sources have no
    weights on disk to load: they are left out."""
    seen = {
        key
        for key, source in _streamed(plan).items()
        if not all((folders[key] / f).is_file() for f in source.weight_files)
    }
    candidates = []
    for role in plan.roles:
        if role.kind == "tokenizer" or role.source.key in seen:
            continue
        seen.add(role.source.key)
        source = role.source
        candidates.append(
            Candidate(role.kind, role.ref.text, folders[source.key], source.ref.repo_id, source.sha)
        )
    return candidates


def _return_freed_memory() -> None:
    """Hand the merge's freed buffers back to the system before the sanity check allocates its own.

    glibc keeps freed heap memory in its arenas (one per thread that allocated), so without this the
    check's peak adds onto the merge's instead of replacing it (1.06 GB against 0.67 GB measured at 1.5B,
    bench/RESULTS.md). Elsewhere than glibc there is nothing to call, and nothing is done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def _sanity_check(
    plan: MergePlan, folder: Path, weights: dict[str, Folder], device: torch.device, log: Log
) -> SanityReport:
    """The quick sanity check of the merge in `folder` against the base and every model (each source once, by
    its first mention), read where the merge read them: streamed sources by range from the Hub again."""
    from .quality.forward import Checkpoint
    from .quality.sanity import check

    sources: dict[str, Checkpoint] = {}
    for role in plan.roles:
        source = role.source
        if role.kind != "tokenizer" and source.key not in sources:
            read_from = weights[source.key]
            sources[source.key] = Checkpoint(
                role.ref.text, read_from, source.config, source.tensors, _identity(source, read_from)
            )
    streamed = [w for w in weights.values() if isinstance(w, RemoteFolder)]
    fetched = sum(w.fetched for w in streamed)
    report = check(folder, list(sources.values()), device)
    log(report.summary())
    if streamed and not report.skipped:
        again = sum(w.fetched for w in streamed) - fetched
        log(f"sanity check: read the streamed sources again by range from the Hub ({again / 1e6:,.1f} MB)")
    for warning in report.warnings:
        log(f"WARNING: sanity check: {warning}")
    return report


def _identity(source: Source, folder: Folder) -> str | None:
    """What a source's weights are (`forward.Checkpoint.identity`): the Hub's sha256 of each weight file at
    its commit, or each local file's stamp (device, inode, size, mtime, ctime: a rewrite moves the ctime);
    None when neither is known."""
    files = source.weight_files
    if source.sha is not None and all(f in source.lfs_sha256 for f in files):
        return json.dumps(["hub", source.ref.repo_id, {f: source.lfs_sha256[f] for f in files}])
    if isinstance(folder, Path):
        try:
            paths = {f: (folder / f).resolve() for f in files}
            stamps = {f: [str(path), *KnownHashes.stamp(path.stat())] for f, path in paths.items()}
        except OSError:
            return None
        return json.dumps(["local", stamps])
    return None


def _evaluate(
    plan: MergePlan, spec: EvalTable, folder: Path, sources: list[Candidate], log: Log
) -> Evaluation:
    """Evaluate the model in `folder` and `sources`; a relative `require` rule always brings the sources in."""
    if not sources and any(r.reference is not None for r in spec.require):
        raise RecipeError(
            f"{plan.recipe.path}: eval.require compares with the sources; keep [eval] sources = true or pass --sources"
        )
    evaluation = evaluate_models(
        [Candidate("merged", "merged", folder), *sources], folder, spec, plan.recipe.path, log
    )
    from .quality.plots import bar_chart

    names = [m.name for m in evaluation.models]
    rows = evaluation.rows()
    bar_chart(
        folder / CHART_FILE,
        f"{plan.recipe.path.name}: lm-evaluation-harness {evaluation.lm_eval_version}",
        [f"{task}\n{metric}" for task, metric, _ in rows],
        {name: [scores[i].value for _, _, scores in rows] for i, name in enumerate(names)},
    )
    return evaluation


def _write_results(folder: Path, evaluation: Evaluation | None, report: SanityReport | None) -> list[str]:
    """eval_results.json (and the chart the evaluation drew); returns the files written."""
    data = {
        "lm_eval": evaluation.to_json() if evaluation is not None else None,
        "sanity": report.to_json() if report is not None else None,
    }
    (folder / RESULTS_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return [RESULTS_FILE, CHART_FILE] if evaluation is not None else [RESULTS_FILE]


def _gate(evaluation: Evaluation, where: str) -> None:
    if evaluation.missed:
        raise GateError(
            f"the merge misses [eval] require ({'; '.join(c.describe() for c in evaluation.missed)}); {where}",
            summary_markdown(evaluation),
        )


@dataclass(frozen=True)
class EvalResult:
    plan: MergePlan
    output_dir: Path
    evaluation: Evaluation


def evaluate(
    recipe_path: str | Path,
    *,
    output_dir: str | Path | None = None,
    sources: bool = False,
    quiet: bool = False,
    log: Log = _stderr,
) -> EvalResult:
    """Evaluate the recipe's merged output folder on its `[eval]` tasks (`sources=True`: the base and every
    model too), then update eval_results.json, the chart, the card and the lock there. Raises `GateError`
    when the merge misses `[eval] require`.
    """
    recipe = load_recipe(recipe_path, output_dir)
    directory = recipe.output.dir
    if not (directory / RECIPE_COPY).is_file():
        raise EvalError(
            f"{directory} holds no hubmerge output to evaluate; run `hubmerge {recipe_path}` first"
        )
    lock = directory / LOCK_FILE
    # Pinned to what the merge read: a recipe edited since then is refused rather than described wrongly.
    merge_plan = load_plan(recipe_path, output_dir, lock if lock.is_file() else None)
    spec = _eval_spec(merge_plan)
    require_lm_eval()
    with_sources = sources or any(r.reference is not None for r in spec.require)
    folders = _fetch_all(merge_plan, quiet, stream=False) if with_sources else {}
    candidates = _source_candidates(merge_plan, folders) if with_sources else []
    evaluation = _evaluate(merge_plan, spec, directory, candidates, log)
    previous = directory / RESULTS_FILE
    report = None
    if previous.is_file():
        recorded = json.loads(previous.read_text(encoding="utf-8")).get("sanity")
        report = SanityReport.from_json(recorded) if recorded else None
    written = _write_results(directory, evaluation, report)
    stats_path = directory / STATS_FILE
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else None
    card = render_card(merge_plan, stats=stats, evaluation=evaluation, sanity=report)
    (directory / CARD_FILE).write_text(card, encoding="utf-8")
    _record_outputs(directory, [*written, CARD_FILE])
    _gate(evaluation, f"the results are in {directory / RESULTS_FILE}")
    return EvalResult(merge_plan, directory, evaluation)


def recorded_results(plan: MergePlan) -> tuple[dict[str, Any] | None, SanityReport | None]:
    """What the merge of `plan` wrote into its output folder for the card: merge_stats.json and the sanity
    report of eval_results.json; (None, None) unless the folder's lock was written for this very recipe."""
    directory = plan.recipe.output.dir
    try:
        lock = json.loads((directory / LOCK_FILE).read_text(encoding="utf-8"))
        if lock["recipe"]["sha256"] != plan.recipe.sha256:
            return None, None
        stats_path, results = directory / STATS_FILE, directory / RESULTS_FILE
        stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else None
        recorded = (
            json.loads(results.read_text(encoding="utf-8")).get("sanity") if results.is_file() else None
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return stats, SanityReport.from_json(recorded) if recorded else None


def _record_outputs(directory: Path, names: list[str]) -> None:
    """Bring the lock's record of the output files up to date after rewriting `names`."""
    path = directory / LOCK_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    files = record["output"]["files"]
    for name in names:
        files[name] = {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
    record["output"]["files"] = dict(sorted(files.items()))
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
