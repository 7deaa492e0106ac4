"""The `hubmerge` command: a thin layer over `hubmerge.api` that turns errors into one line and an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from . import __version__
from .errors import ConfigImportError, GateError, HubmergeError

__all__ = ["main"]

COMMANDS = ("validate", "plan", "card", "inspect", "eval", "search", "schema")
_EPILOG = """commands:
  hubmerge RECIPE.toml            merge, write the model folder and card, push if [output] repo is set
  hubmerge validate RECIPE...     check recipes (schema and references) without reading weights
  hubmerge plan RECIPE [--json]   resolve sources and print what a merge would do (same as --dry-run)
  hubmerge card RECIPE [--file F] render the model card alone
  hubmerge inspect RECIPE [--output DIR]
                                  merge diagnostics without merging: merge_stats.json and plots in DIR
                                  (default: the output folder + "-inspect")
  hubmerge eval RECIPE [--sources]
                                  run the recipe's [eval] lm-eval tasks on its output folder (and the
                                  sources); needs pip install "hubmerge[eval]"
  hubmerge gguf FOLDER [--type q4_k_m] [-o FILE]
                                  write a GGUF file (llama.cpp, Ollama, LM Studio) of a Qwen2 model folder
  hubmerge search RECIPE [--output DIR] [--trials N] [--ray [ADDRESS]] [--publish best]
                                  search the recipe's [search] values: trials merged, scored and removed;
                                  writes DIR/best.toml and search_results.json/.csv; rerun to resume;
                                  needs pip install "hubmerge[search]" (and "hubmerge[ray]" for --ray)
  hubmerge schema                 print the recipe's JSON Schema, for editors (`#:schema` line) and CI
  hubmerge import-mergekit CONFIG.yml [-o RECIPE.toml]
                                  convert a mergekit config into an equivalent recipe (stdout without -o);
                                  what cannot be converted is listed, one line per key
  hubmerge ui [--host H] [--port N] [--public]
                                  serve the web app (editor, plan, merge, card, push) and its API;
                                  needs pip install "hubmerge[ui]"

exit codes: 0 ok, 1 other error (output folder, disk full, lock not reproduced), 2 recipe, 3 source,
  4 incompatible sources, 5 card, 6 publish, 7 evaluation failed, 8 the merge missed [eval] require
  (not pushed), 70 internal error (a bug: please report it), 130 interrupted (Ctrl-C),
  143 terminated (SIGTERM).
Set HUBMERGE_DEBUG=1 to see tracebacks; HUBMERGE_NO_SANITY=1 is the same as --no-sanity."""


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hubmerge",
        description="Merge Qwen2.5 checkpoints from a TOML recipe and publish the result to the Hugging Face Hub.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", type=Path, help="the recipe file (TOML)")
    p.add_argument("--output", type=Path, help="output folder (overrides [output] dir)")
    p.add_argument("--no-push", action="store_true", help="do not push even if [output] repo is set")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and stop (no weights are downloaded)"
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the arithmetic runs (default cpu)"
    )
    p.add_argument("--lock", type=Path, help="reproduce the merge recorded in this hubmerge.lock.json")
    _max_disk_option(p)
    p.add_argument(
        "--summary",
        type=Path,
        default=_default_summary(),
        help="append a Markdown summary here (default: $GITHUB_STEP_SUMMARY when set)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only errors and warnings")
    p.add_argument(
        "--no-stats", action="store_true", help="skip the merge diagnostics (merge_stats.json and plots)"
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help='evaluate the merge with the recipe\'s [eval] table before publishing (needs "hubmerge[eval]")',
    )
    p.add_argument(
        "--no-sanity",
        action="store_true",
        help="skip the quick sanity check (is the merge finite, is its loss on a few texts near the sources')",
    )
    p.add_argument("--version", action="version", version=f"hubmerge {__version__}")
    return p


def _size(value: str) -> int:
    from .recipe.load import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _max_disk_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-disk",
        type=_size,
        metavar="SIZE",
        help='disk the run may use, e.g. "14GB" (overrides [output] max_disk; default: the free space of the '
        "HF cache's and the output's filesystems, minus a margin); sources that do not fit are streamed",
    )


def _default_summary() -> Path | None:
    value = os.environ.get("GITHUB_STEP_SUMMARY")
    return Path(value) if value else None


_DESCRIPTIONS = {
    "validate": "Check recipes (schema, parameters, local folders) without reading weights or the network. "
    "Every recipe is checked and reported; the exit code is that of the first failure.",
    "plan": "Resolve the recipe's sources (metadata only) and print what a merge would do: shas, files to "
    "download, output tensors and bytes, memory and disk estimates, push target.",
    "card": "Render the model card (README.md) the merge would write, without merging.",
    "inspect": "Compute the merge diagnostics (task-vector norms, pairwise cosines, sign conflicts) in one "
    "streaming pass without merging, and write merge_stats.json and its plots.",
    "schema": "Print the recipe's JSON Schema (draft 2020-12), generated from the method registry: editors "
    "that read a `#:schema PATH` first line (Taplo / Even Better TOML, Tombi) then complete and check recipes.",
    "eval": "Evaluate the recipe's merged output folder on its [eval] lm-evaluation-harness tasks (and, with "
    "--sources, the base and every model), then update eval_results.json, the chart, the card and the lock.",
    "gguf": "Write a GGUF file of a Qwen2-architecture model folder (merged or not) for llama.cpp, Ollama "
    "and LM Studio: F32/F16/BF16, Q8_0, or a K-quant (Q6_K, and the Q5_K_M / Q4_K_M mixes llama-quantize "
    "makes), quantized by hubmerge a tensor at a time.",
    "search": "Search the values of the recipe's [search] table: each trial merges the recipe with its values "
    "into scratch, scores the merge (the built-in loss or [eval] tasks) and removes it. The study is kept in "
    "DIR/study.db: running the same command again resumes it without repeating finished trials.",
    "import-mergekit": "Convert a mergekit (0.1.5) YAML config into a hubmerge recipe that merges the same: "
    "method, base, models, parameters (gradients and filters), dtype, tokenizer source. What has no "
    "equivalent (layer-range slices, LoRA references, MoE, modules, ...) is listed one line per key, and "
    "nothing is written; what mergekit reads without effect is dropped with a note.",
}


def _command_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"hubmerge {command}", description=_DESCRIPTIONS[command])
    if command == "validate":
        p.add_argument("recipes", type=Path, nargs="+", help="recipe files (TOML)")
    elif command == "import-mergekit":
        p.add_argument("config", type=Path, help="the mergekit config (YAML)")
        p.add_argument(
            "-o",
            "--output",
            type=Path,
            help="write the recipe here (it must not exist yet; local model folders are named relative to "
            "it); default: print it",
        )
    elif command == "gguf":
        from .gguf.writer import GGUF_TYPES

        p.add_argument("folder", type=Path, help="the model folder (config.json, safetensors, tokenizer)")
        p.add_argument("--type", choices=tuple(GGUF_TYPES), default="q4_k_m", help="default: q4_k_m")
        p.add_argument(
            "-o", "--output", type=Path, help="the file to write (default: FOLDER/FOLDER-TYPE.gguf)"
        )
    elif command != "schema":
        p.add_argument("recipe", type=Path, help="the recipe file (TOML)")
        where = (
            f'write here (default: the output folder + "-{command}")'
            if command in ("inspect", "search")
            else "the merge's output folder, as for a merge (overrides [output] dir)"
        )
        p.add_argument("--output", type=Path, help=where)
    if command == "search":
        p.add_argument("--trials", type=int, metavar="N", help="how many trials (overrides [search] trials)")
        p.add_argument(
            "--ray",
            nargs="?",
            const="",
            metavar="ADDRESS",
            help="run trials as Ray tasks on the cluster at ADDRESS (default: $RAY_ADDRESS, else a local Ray)",
        )
        p.add_argument(
            "--publish",
            choices=("best",),
            help="then merge best.toml and push it to [output] repo, its card saying how it was found",
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no line per trial")
    if command == "plan":
        p.add_argument("--json", action="store_true", help="print the plan as JSON")
        p.add_argument(
            "--explain",
            metavar="PARAM",
            help="print the value of a method parameter for every tensor (gradients and filters resolved)",
        )
        p.add_argument("--lock", type=Path, help="pin sources to this hubmerge.lock.json")
        _max_disk_option(p)
        p.add_argument(
            "--summary", type=Path, default=_default_summary(), help="append a Markdown summary here"
        )
    if command == "card":
        p.add_argument("--file", type=Path, help="write the card to this file instead of stdout")
    if command == "eval":
        p.add_argument(
            "--sources", action="store_true", help="also evaluate the base and every model (cached)"
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "--summary",
            type=Path,
            default=_default_summary(),
            help="append the results table here (Markdown)",
        )
    if command == "inspect":
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the arithmetic runs")
        p.add_argument("--lock", type=Path, help="pin sources to this hubmerge.lock.json")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _append(path: Path | None, text: str) -> None:
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def _validate_one(path: Path) -> None:
    from .recipe.load import load_recipe, missing_folder

    recipe = load_recipe(path)
    missing_folder(recipe, path)
    for warning in recipe.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    count = len(recipe.models)
    print(f"ok  {path}  ({recipe.method.name}, {count} model{'' if count == 1 else 's'})")


def _validate(paths: Sequence[Path]) -> int:
    """Check every recipe, one line each; a bad one does not hide the ones after it."""
    first_failure = 0
    for path in paths:
        try:
            _validate_one(path)
        except HubmergeError as exc:
            if len(paths) == 1:
                raise  # the usual one-line error of every command
            print(f"hubmerge: error: {' '.join(str(exc).split())}", file=sys.stderr)
            first_failure = first_failure or exc.exit_code
    return first_failure


def _import_mergekit(args: argparse.Namespace) -> int:
    from .interop.mergekit import import_mergekit

    imported = import_mergekit(args.config, args.output)
    for note in imported.notes:
        print(f"note: {args.config}: {note}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(imported.text)
        return 0
    try:
        with open(args.output, "x", encoding="utf-8") as f:  # never over a file this run did not make
            f.write(imported.text)
    except FileExistsError:
        raise HubmergeError(f"{args.output} exists; choose another -o or remove it") from None
    except OSError as exc:
        raise HubmergeError(f"cannot write {args.output} ({exc.strerror or exc})") from None
    print(f"wrote {args.output} ({imported.method}); check it with: hubmerge validate {args.output}")
    return 0


def _gguf(args: argparse.Namespace) -> int:
    from .gguf.writer import file_name, write_gguf

    path = args.output or args.folder / file_name(args.folder.resolve().name, args.type)
    if path.exists():
        raise HubmergeError(f"{path} exists; remove it or choose another -o")
    written = write_gguf(args.folder, path, args.type)
    print(
        f"wrote {written.path} ({args.type}, {written.size / 1e6:.1f} MB, {written.bits_per_weight:.2f} bits per weight)"
    )
    return 0


def _dispatch(argv: Sequence[str]) -> int:
    if argv and argv[0] == "validate":  # before importing the merge API: validating needs no torch
        return _validate(_command_parser("validate").parse_args(argv[1:]).recipes)
    if argv and argv[0] == "schema":  # the same: no torch
        from .recipe.schema import json_schema

        _command_parser("schema").parse_args(argv[1:])
        print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return 0
    if argv and argv[0] == "import-mergekit":  # nor does importing a mergekit config
        return _import_mergekit(_command_parser("import-mergekit").parse_args(argv[1:]))
    if argv and argv[0] == "ui":
        from .ui.cli import main as serve

        return serve(argv[1:])

    if argv and argv[0] == "gguf":
        return _gguf(_command_parser("gguf").parse_args(argv[1:]))

    # The arguments first: --help, --version and a usage error exit here, before the merge API loads torch.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = _command_parser(command).parse_args(argv[1:]) if command else _run_parser().parse_args(argv)

    from . import api
    from .merging.report import explain, plan_json, plan_text, summary_markdown

    if command == "inspect":
        return _inspect(args)
    if command == "eval":
        return _eval(args)
    if command == "search":
        return _search(args)
    if command is not None:
        merge_plan = api.load_plan(
            args.recipe, args.output, getattr(args, "lock", None), getattr(args, "max_disk", None)
        )
        if command == "plan" and args.explain:
            print(explain(merge_plan, args.explain))
            return 0
        if command == "plan":
            print(json.dumps(plan_json(merge_plan), indent=2) if args.json else plan_text(merge_plan))
            _append(args.summary, summary_markdown(merge_plan))
            return 0
        from .publish.card import render_card

        stats, sanity = api.recorded_results(merge_plan)  # the diagnostics an earlier merge wrote there
        card = render_card(merge_plan, stats=stats, sanity=sanity)
        if args.file:
            args.file.write_text(card)
        else:
            sys.stdout.write(card)
        return 0

    if args.dry_run:
        merge_plan = api.load_plan(args.recipe, args.output, args.lock, args.max_disk)
        print(plan_text(merge_plan))
        _append(args.summary, summary_markdown(merge_plan))
        return 0
    try:
        result = api.merge(
            args.recipe,
            output_dir=args.output,
            push=not args.no_push,
            device=args.device,
            lock=args.lock,
            quiet=args.quiet,
            stats=not args.no_stats,
            evaluate=args.eval,
            sanity=not args.no_sanity and os.environ.get("HUBMERGE_NO_SANITY") in (None, "", "0"),
            max_disk=args.max_disk,
        )
    except GateError as exc:
        _append(args.summary, exc.summary)
        raise
    if not args.quiet:
        print(f"wrote {result.output_dir}")
    if result.evaluation is not None:  # as `hubmerge eval` prints it
        from .quality.evaluate import results_table

        print(results_table(result.evaluation), end="")
    if result.commit_url:
        print(result.commit_url)
    _append(args.summary, summary_markdown(result.plan, result.commit_url, merged=True))
    if result.evaluation is not None:
        from .quality.evaluate import summary_markdown as eval_summary

        _append(args.summary, eval_summary(result.evaluation))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import api
    from .quality.evaluate import results_table, summary_markdown

    try:
        result = api.evaluate(args.recipe, output_dir=args.output, sources=args.sources, quiet=args.quiet)
    except GateError as exc:
        _append(args.summary, exc.summary)
        raise
    print(results_table(result.evaluation), end="")
    _append(args.summary, summary_markdown(result.evaluation))
    return 0


def _search(args: argparse.Namespace) -> int:
    from .search.run import BEST_FILE, RESULTS_JSON, search

    if args.trials is not None and args.trials < 1:
        raise HubmergeError(f"--trials must be at least 1, got {args.trials}")
    if args.publish:
        from .search.publish import check_publishable

        check_publishable(args.recipe)  # before the first trial, not after the last
    log = (lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
    result = search(
        args.recipe,
        output_dir=args.output,
        trials=args.trials,
        ray=args.ray is not None,
        ray_address=args.ray or None,
        log=log,
    )
    best = result.best
    if best is None:
        print(f"no trial completed; see {result.output_dir / RESULTS_JSON}")
        return 1
    print(f"best: trial {best['number']}, score {best['score']:.6g} ({result.direction}d), {best['params']}")
    print(f"wrote {result.output_dir / BEST_FILE} and {result.output_dir / RESULTS_JSON}")
    if args.publish:
        from .recipe.load import load_recipe
        from .search.publish import publish_best

        spec = load_recipe(args.recipe).search
        assert spec is not None  # search() refuses a recipe without one
        merged = publish_best(result, spec, log)
        print(f"merged {result.output_dir / BEST_FILE} into {merged.output_dir}; pushed {merged.commit_url}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from . import api
    from .quality.diagnostics import summary_text

    result = api.inspect(
        args.recipe, output_dir=args.output, device=args.device, lock=args.lock, quiet=args.quiet
    )
    print(summary_text(result.stats))
    print(f"wrote {', '.join(result.files)} to {result.output_dir}")
    return 0


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop now: remove this run's staging folder and exit, without waiting for threads to finish.

    Unwinding would wait for reads, writes, downloads and hashing still running on other threads, which
    can take minutes on gigabytes; nothing they hold needs more cleanup than a crash does.
    """
    name = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"

    def finish() -> None:
        if "hubmerge.search.run" in sys.modules:  # a search keeps its finished trials in its study
            print(f"hubmerge: {name}; run the same command again to resume the search", file=sys.stderr)
        else:
            print(f"hubmerge: {name}; the previous output, if any, was left as it was", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(128 + signum)

    output = sys.modules.get("hubmerge.publish.output")  # not imported yet: no staging folder exists
    if output is None:
        finish()
    else:
        output.abandon(finish)


@contextmanager
def _cli_process(debug: bool) -> Iterator[None]:
    """What only the command line does: prompt signals, and no library log lines past our one-line errors."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = logging.root.manager.disable
    try:
        with warnings.catch_warnings():
            if not debug:
                # huggingface_hub and transformers log warnings such as "Repo card metadata block was not
                # found" that break the one-line error contract; our own warnings go through `log`.
                warnings.simplefilter("ignore")
                logging.disable(logging.CRITICAL)
            yield
    finally:
        logging.disable(previous)
        for s, handler in handlers.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("HUBMERGE_DEBUG") not in (None, "", "0")
    try:
        with _cli_process(debug):
            return _dispatch(argv)
    except HubmergeError as exc:
        if debug:
            traceback.print_exc()
        for problem in exc.problems if isinstance(exc, ConfigImportError) else (str(exc),):  # one line each
            print(f"hubmerge: error: {' '.join(problem.split())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # only where the handler is not ours (main() called off the main thread)
        print("hubmerge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hubmerge plan ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except Exception as exc:
        if debug:
            raise
        print(
            f"hubmerge: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (run with "
            "HUBMERGE_DEBUG=1 for a traceback and please report it)",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
