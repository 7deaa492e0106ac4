"""`hubmerge` called as a function: `cli.main(argv)` in this process, its output captured.

A new Python process per call costs seconds (torch's import); tests that are not about the process itself
(signals, kill -9, start-up imports, the interpreter's own stderr) call the CLI here instead, with what
`run_cli` returns. The environment and working directory a test passes hold for the call only.
`huggingface_hub` reads its settings (endpoint, HF_HOME, offline, progress bars) once at import, so they
are read again from the environment around each call, and its per-process caches (the shared HTTP client,
`HfFileSystem` instances) are dropped, as a new process would start without them.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


def _hub_settings_from_environment() -> None:
    """What a fresh process would see: huggingface_hub's constants and caches as the environment says now."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import close_session

    constants = importlib.reload(importlib.import_module("huggingface_hub.constants"))
    progress = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not the class it exports
    progress.HF_HUB_DISABLE_PROGRESS_BARS = constants.HF_HUB_DISABLE_PROGRESS_BARS
    progress.progress_bar_states.clear()
    importlib.import_module(
        "huggingface_hub.hf_api"
    ).api.endpoint = constants.ENDPOINT  # behind module functions
    HfFileSystem.clear_instance_cache()
    close_session()  # the shared client read the proxy settings when it was made


@contextmanager
def process_like(cwd: Path | str | None, env: dict[str, str] | None) -> Iterator[None]:
    """Inside the block, this process sees `env` and `cwd` as a new process started with them would, the Hub
    client's settings included; both are put back after it."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    os.environ.pop("HUBMERGE_DEBUG", None)  # as run_cli: the one-line errors, not tracebacks
    try:
        _hub_settings_from_environment()
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        _hub_settings_from_environment()


def invoke_cli(
    *args: str | Path, cwd: Path | str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`hubmerge ARGS` in this process: exit code, stdout and stderr as `run_cli` returns them."""
    from hubmerge import cli

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with process_like(cwd, env), redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(
        [sys.executable, "-m", "hubmerge.cli", *argv], code, out.getvalue(), err.getvalue()
    )


def invoke_cli_on_a_thread(
    *args: str | Path, cwd: Path | str | None = None, env: dict[str, str] | None = None
) -> Future[subprocess.CompletedProcess[str]]:
    """`invoke_cli` on a thread of its own, for a test that acts (on the Hub, on the disk) while the command
    waits: the future's result is what `invoke_cli` returns."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-cli")
    future = pool.submit(invoke_cli, *args, cwd=cwd, env=env)
    pool.shutdown(wait=False)
    return future


def start_cli(*args: str | Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    """A real `hubmerge` process, for what only a process shows (signals, kill -9), its output piped."""
    full_env = {**os.environ, **env}
    full_env.pop("HUBMERGE_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "hubmerge.cli", *map(str, args)],
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `hubmerge` entry point in a subprocess (what a user's shell does)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HUBMERGE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
