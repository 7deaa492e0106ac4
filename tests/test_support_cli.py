"""The in-process CLI runner (tests/support/cli.py) gives what a process would, and leaves no trace."""

from __future__ import annotations

import os
from pathlib import Path

from support.checkpoints import REPO
from support.cli import invoke_cli


def test_a_call_sees_its_env_and_cwd_and_leaves_the_tests_own_unchanged(tmp_path: Path) -> None:
    from huggingface_hub import constants

    env_before, cwd_before, endpoint_before = dict(os.environ), os.getcwd(), constants.ENDPOINT
    (tmp_path / "r.toml").write_text('method = "simple_average"\nmodels = ["./nowhere"]\n')
    # A relative recipe path resolves against the call's cwd; the endpoint is read from the call's env.
    result = invoke_cli("validate", "r.toml", cwd=tmp_path, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 3 and "'./nowhere' is not a folder" in result.stderr
    assert result.stdout == ""
    assert (dict(os.environ), os.getcwd(), constants.ENDPOINT) == (env_before, cwd_before, endpoint_before)


def test_exit_codes_and_output_are_the_commands(tmp_path: Path) -> None:
    assert invoke_cli("--version").stdout.startswith("hubmerge ")
    usage = invoke_cli("plan")  # argparse's own exit: a usage line and code 2
    assert usage.returncode == 2 and "usage: hubmerge plan" in usage.stderr
    ok = invoke_cli("validate", REPO / "recipes" / "examples" / "tiny-ties.toml")
    assert (ok.returncode, ok.stderr) == (0, "") and ok.stdout.startswith("ok  ")
