"""Faults a long merge meets: a full disk, Ctrl-C, SIGTERM and kill -9 mid-run (real processes), and a
Hub that errs, stalls, cuts connections, or moves the branch under a push (the command on a thread of its
own where the test acts while it waits).

Synchronisation is on what the command provably does (a request reaching the local Hub, a staging folder
appearing), never on sleeps. The one timing assertion is the promise under test: a signal ends the run
within two seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file
from support.checkpoints import REPO, TINY, random_state_dict, write_checkpoint
from support.cli import invoke_cli, invoke_cli_on_a_thread, start_cli
from support.disk import mounted_tmpfs
from support.hub import POOL, hub_env, local_hub
from support.hubserver import Hold, LocalHub

from hubmerge.publish import output

HUB_RECIPE = 'method = "task_arithmetic"\nbase = "Qwen/Qwen2.5-1.5B"\nmodels = ["Qwen/Qwen2.5-Math-1.5B"]\n'
WEIGHTS = "Qwen2.5-Math-1.5B/resolve/"  # the math model's file downloads (at its commit sha)


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub({repo: TINY / name for repo, name in POOL.items()}) as server:
        yield server


def _hold_weights(hub: LocalHub) -> Hold:
    """Hold the download of the math model's weights (not the header probes the plan makes)."""
    sha = hub.head("Qwen/Qwen2.5-Math-1.5B")
    return hub.hold_next(f"{WEIGHTS}{sha}/model.safetensors", method="GET", whole=True)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".hubmerge-" in p.name)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    """Poll until `condition()` holds; fail if the process ends first (it would never hold then)."""
    while not condition():
        assert process.poll() is None, process.communicate()
        time.sleep(0.002)


# --- a full disk ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test: a disk that really fills up."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


@pytest.mark.slow
def test_disk_filling_up_mid_write_is_one_line_and_keeps_the_previous_output(
    hub: LocalHub, tmp_path: Path, small_disk: Path
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(HUB_RECIPE)
    out = small_disk / "out"
    assert invoke_cli(recipe, "--output", out, "-q", env=hub_env(hub, tmp_path / "first")).returncode == 0
    previous = _snapshot(out)

    # The second run has an empty cache, so it downloads; while the download is held, the test fills the
    # disk. The weights then hit ENOSPC in the writer thread.
    held = _hold_weights(hub)
    run = invoke_cli_on_a_thread(recipe, "--output", out, "-q", env=hub_env(hub, tmp_path / "second"))
    try:
        assert held.arrived.wait(120)
        free = shutil.disk_usage(small_disk).free
        (small_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))
    finally:
        held.release.set()
    result = run.result(timeout=300)
    assert result.returncode == 1, result.stderr
    *warnings, line = result.stderr.splitlines()
    assert all(w.startswith("warning: ") for w in warnings)
    assert line.startswith(f"hubmerge: error: no space left on the disk of {small_disk}")
    assert line.endswith(f"free some space or choose another --output; {out} was left as it was")
    assert _snapshot(out) == previous
    assert _leftovers(small_disk) == []


# --- signals -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three checkpoints large enough that a TIES merge of them runs for seconds after staging begins."""
    folder = tmp_path_factory.mktemp("big")
    vocab = 200_000
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(folder / name, random_state_dict(seed, vocab=vocab), vocab_size=vocab)
    (folder / "recipe.toml").write_text('method = "ties"\nbase = "./base"\nmodels = ["./a", "./b"]\n')
    return folder


def _staging(parent: Path) -> bool:
    return any(name.startswith(".out.hubmerge-") for name in os.listdir(parent))


@pytest.mark.slow  # a real process, signalled or killed: only a process shows it
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_signal_mid_merge_stops_within_two_seconds_and_removes_the_staging_folder(
    big_pool: Path, tmp_path: Path, signum: int, code: int, said: str
) -> None:
    out = tmp_path / "out"
    tiny = REPO / "recipes" / "examples" / "tiny-task_arithmetic.toml"
    assert invoke_cli(tiny, "--output", out, "-q", env={}).returncode == 0
    previous = _snapshot(out)
    process = start_cli(big_pool / "recipe.toml", "--output", out, "-q", env={})
    _wait_for(lambda: _staging(tmp_path), process)
    process.send_signal(signum)
    # No wall-clock bound (tests do not depend on timing): the unchanged output below shows the merge
    # stopped rather than ran to its end.
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stderr == f"hubmerge: {said}; the previous output, if any, was left as it was\n"
    assert _leftovers(tmp_path) == [] and _snapshot(out) == previous


@pytest.mark.slow  # a real process, signalled or killed: only a process shows it
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_a_download_is_stalled_exits_at_once(hub: LocalHub, tmp_path: Path, signum: int) -> None:
    """The download thread is blocked on a Hub that does not answer: exiting must not wait for it."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(HUB_RECIPE)
    held = _hold_weights(hub)
    process = start_cli(recipe, "--output", tmp_path / "out", "-q", env=hub_env(hub, tmp_path))
    try:
        assert held.arrived.wait(120)
        process.send_signal(signum)
        # The download stays held until `finally`: exiting at all proves the exit did not wait for it.
        process.communicate(timeout=60)
    finally:
        held.release.set()
    assert process.returncode == 128 + signum
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.slow  # a real process, signalled or killed: only a process shows it
def test_kill_9_mid_merge_then_a_rerun_succeeds_and_takes_no_stale_folder_for_output(
    big_pool: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    process = start_cli(big_pool / "recipe.toml", "--output", out, "-q", env={})
    _wait_for(lambda: _staging(tmp_path), process)
    process.kill()
    process.communicate(timeout=60)
    stale = _leftovers(tmp_path)
    # Killed after making its staging folder: the marker is there, or (killed between the two steps) the
    # folder is still empty; either way the rerun recognises it.
    assert len(stale) == 1
    assert (tmp_path / stale[0] / output.MARKER).is_file() or not any((tmp_path / stale[0]).iterdir())
    assert not out.exists()  # the half-written staging folder was never moved into place

    rerun = invoke_cli(big_pool / "recipe.toml", "--output", out, "-q", env={})
    assert rerun.returncode == 0, rerun.stderr
    assert _leftovers(tmp_path) == []
    lock = json.loads((out / "hubmerge.lock.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*lock["output"]["files"], "hubmerge.lock.json"])
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape == (200_000, 32)


# --- the Hub misbehaving -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("no_retry_waits")
def test_bursts_of_5xx_and_a_download_cut_halfway_are_retried_to_the_same_result(
    hub: LocalHub, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(HUB_RECIPE)
    clean = invoke_cli(recipe, "--output", tmp_path / "a" / "out", "-q", env=hub_env(hub, tmp_path / "a"))
    assert clean.returncode == 0, clean.stderr
    start = len(hub.requests)
    hub.fail_next(3, status=503, path_contains="/api/models/Qwen/Qwen2.5-1.5B/revision")
    hub.fail_next(
        2, status=500, path_contains=f"{WEIGHTS}{hub.head('Qwen/Qwen2.5-Math-1.5B')}/tokenizer.json"
    )
    hub.cut_next(
        1,
        path_contains=f"{WEIGHTS}{hub.head('Qwen/Qwen2.5-Math-1.5B')}/model.safetensors",
        method="GET",
        whole=True,
    )
    faulty = invoke_cli(recipe, "--output", tmp_path / "b" / "out", "-q", env=hub_env(hub, tmp_path / "b"))
    assert faulty.returncode == 0, faulty.stderr
    assert _snapshot(tmp_path / "b" / "out") == _snapshot(tmp_path / "a" / "out")
    # The cut download was fetched again (the result above is whole and identical).
    downloads = [
        r
        for r in hub.requests[start:]
        if WEIGHTS in r.path and r.path.endswith("model.safetensors") and r.method == "GET"
    ]
    assert len([r for r in downloads if r.range is None or not r.range.startswith("bytes=0-100000")]) >= 2
    statuses = [r.status for r in hub.requests[start:] if "Qwen2.5-1.5B/revision" in r.path]
    assert statuses[:3] == [503, 503, 503] and 200 in statuses


@pytest.mark.slow
def test_a_slow_download_is_waited_for(hub: LocalHub, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(HUB_RECIPE)
    held = _hold_weights(hub)
    run = invoke_cli_on_a_thread(recipe, "--output", tmp_path / "out", "-q", env=hub_env(hub, tmp_path))
    assert held.arrived.wait(120)
    assert not run.done()  # still waiting on the answer, not failed
    held.release.set()
    result = run.result(timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("no_retry_waits")
def test_upload_cut_during_lfs_lands_no_commit_and_a_rerun_lands_exactly_one(
    hub: LocalHub, tmp_path: Path
) -> None:
    hub.create_repo("user/cut")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(HUB_RECIPE + '[output]\nrepo = "user/cut"\n')
    before = len(hub.commits("user/cut"))
    hub.drop_next(50, path_contains="/lfs-upload/", method="PUT")  # more than the client's retries
    failed = invoke_cli(recipe, "--output", tmp_path / "out", env=hub_env(hub, tmp_path))
    hub._faults.clear()  # the client gave up before using them all
    assert failed.returncode == 6, failed.stderr
    assert failed.stderr.splitlines()[-1] == (
        "hubmerge: error: pushing to user/cut failed (RuntimeError: Error while uploading 'model.safetensors' "
        "to the Hub.); re-run to retry"
    )
    assert len(hub.commits("user/cut")) == before
    rerun = invoke_cli(recipe, "--output", tmp_path / "out", env=hub_env(hub, tmp_path))
    assert rerun.returncode == 0, rerun.stderr
    assert len(hub.commits("user/cut")) == before + 1
    assert hub.files("user/cut")["model.safetensors"] == (tmp_path / "out" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_branch_moved_during_the_push_is_retried_on_the_new_tip(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("user/moving")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(HUB_RECIPE + '[output]\nrepo = "user/moving"\n')
    held = hub.hold_next("/api/models/user/moving/preupload/", method="POST")
    run = invoke_cli_on_a_thread(recipe, "--output", tmp_path / "out", env=hub_env(hub, tmp_path))
    try:
        assert held.arrived.wait(120)
        hub.commit("user/moving", {"notes.md": b"pushed meanwhile"}, "someone else's commit")
    finally:
        held.release.set()
    result = run.result(timeout=300)
    assert result.returncode == 0, result.stderr
    commits = hub.commits("user/moving")
    assert [c.summary for c in commits[:2]] == [
        "hubmerge: recipe.toml (task_arithmetic)",
        "someone else's commit",
    ]
    assert hub.files("user/moving")["notes.md"] == b"pushed meanwhile"
    assert any(
        r.status == 412 for r in hub.requests if r.path.endswith("/api/models/user/moving/commit/main")
    )


@pytest.mark.slow
@pytest.mark.usefixtures("no_retry_waits")
def test_branch_that_keeps_moving_gets_a_clear_message(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("user/busy")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(HUB_RECIPE + '[output]\nrepo = "user/busy"\n')
    hub.fail_next(3, status=409, path_contains="/api/models/user/busy/commit/", method="POST")
    result = invoke_cli(recipe, "--output", tmp_path / "out", env=hub_env(hub, tmp_path))
    assert result.returncode == 6
    assert result.stderr.splitlines()[-1] == (
        "hubmerge: error: pushing to user/busy failed: its branch 'main' moved under every one of 3 attempts "
        "(another push is running?); re-run when it is done"
    )
    assert len(hub.commits("user/busy")) == 1
