"""Streaming output to the Hub (`publish.ShardUploader`): each shard goes up as soon as it is closed, while
the merge writes the next, and one commit is made once everything is uploaded, against the local Hub in
`support/hubserver/`: merges in this process on a thread of their own (`_traced`), and real processes where
a kill or a signal is the subject.

The order of events is read from the Hub's request log, never from timing: `_traced` wraps the
engine's `on_shard` hook so that each shard closing also sends a marker request (`/hook/closed/NAME`) to
the Hub, which the log places among the upload requests, and records which shards were on the disk then.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.cli import invoke_cli, process_like, start_cli
from support.hub import hub_env, local_hub
from support.hubserver import LocalHub
from support.reference import cancelling_pool

SUMMARY = "hubmerge: recipe.toml (task_arithmetic)"
RECIPE = (
    'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a", "./b"]\n'
    '[output]\nrepo = "{repo}"\nmax_shard_size = "8KB"\n'
)


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub() as server:
        yield server


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny local checkpoints and, in `reference/`, their merge written without any push."""
    folder = tmp_path_factory.mktemp("pool")
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(folder / name, random_state_dict(seed))
    recipe = _recipe(folder, "user/unused")
    assert invoke_cli(recipe, "--no-push", "--output", folder / "reference", "-q").returncode == 0
    return folder


def _recipe(folder: Path, repo: str, text: str = RECIPE) -> Path:
    (folder / "recipe.toml").write_text(text.format(repo=repo))
    return folder / "recipe.toml"


def _traced(
    hub: LocalHub, recipe: Path, out: Path, *, hold_first_upload: bool = False, **options: bool
) -> tuple[int, dict]:
    """`hubmerge.merge` with a push, in this process on a thread of its own, the engine's shard hook traced
    (see the module docstring): (exit code, {"events": the shards closed, each with the shards on the disk
    just before and after, and "url", the commit's, or "error", the one line}).

    With `hold_first_upload`, the Hub answers the first LFS upload only once the next shard's close marker
    has arrived: the upload provably overlaps the merge, however fast either side is."""
    import hubmerge.api as api
    from hubmerge.errors import HubmergeError

    write_weights, events = api.write_weights, []

    def traced(plan, folders, directory, device, progress, stats=None, on_shard=None):
        def hook(path: Path) -> None:
            before = sorted(p.name for p in directory.glob("*.safetensors"))
            # A 404: the request is in the Hub's log, which is all it is for.
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(f"{hub.url}/hook/closed/{path.name}")
            if on_shard is not None:
                on_shard(path)
            after = sorted(p.name for p in directory.glob("*.safetensors"))
            events.append({"closed": path.name, "before": before, "after": after})

        return write_weights(plan, folders, directory, device, progress, stats, hook)

    result: dict = {}

    def run() -> None:
        try:
            merged = api.merge(recipe, output_dir=out, push=True, quiet=True, log=lambda _: None, **options)
            result.update(code=0, url=merged.commit_url)
        except HubmergeError as exc:
            result.update(code=exc.exit_code, error=str(exc))

    held = hub.hold_next("/lfs-upload/", method="PUT") if hold_first_upload else None
    since = len(hub.requests)
    api.write_weights = traced
    try:
        with process_like(None, hub_env(hub, out.parent / "home")):
            thread = threading.Thread(target=run, name="traced-merge")
            thread.start()
            try:
                if held is not None:
                    assert held.arrived.wait(120), "the first shard was never uploaded"
                    # The first shard's marker came before its upload; the second one's comes while it is held.
                    _wait_for(
                        lambda: sum(r.path.startswith("/hook/closed/") for r in hub.requests[since:]) >= 2
                    )
                    held.release.set()
            finally:
                if held is not None:
                    held.release.set()
                thread.join(300)
            assert not thread.is_alive(), "the merge did not finish"
    finally:
        api.write_weights = write_weights
    assert "code" in result, "the merge raised something other than a HubmergeError"
    return result.pop("code"), {"events": events, **result}


def _wait_for(condition: Callable[[], bool], limit: float = 120.0) -> None:
    """Poll `condition` until it holds; `limit` only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the merge stopped before the next shard closed"
        time.sleep(0.01)


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model-*.safetensors"))}


def _log(hub: LocalHub, since: int) -> list[tuple[str, str, int]]:
    return [(r.method, r.path, r.status) for r in hub.requests[since:]]


@pytest.mark.slow  # merges with the engine traced (`_traced`)
def test_shards_go_up_while_merging_and_one_commit_equals_a_plain_push(pool: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "user/merged", RECIPE.replace("./", f"{pool}/"))
    # The same recipe pushed the way it was before streaming, to another Hub: the reference commit.
    with local_hub() as plain_hub:
        code, plain = _traced(plain_hub, recipe, tmp_path / "plain" / "out", upload_while_merging=False)
        assert code == 0, plain
        assert all(e["before"] == e["after"] for e in plain["events"])  # nothing left during the merge
        plain_files, plain_commits = plain_hub.files("user/merged"), plain_hub.commits("user/merged")

    with local_hub() as hub:
        code, streamed = _traced(hub, recipe, tmp_path / "streamed" / "out")
        assert code == 0, streamed
        log = _log(hub, 0)
        files, commits = hub.files("user/merged"), hub.commits("user/merged")

    shards = sorted(_shards(pool / "reference"))
    assert len(shards) >= 4
    assert [e["closed"] for e in streamed["events"]] == shards
    # The first shard was stored on the Hub before the last one was even written.
    puts = [i for i, (method, path, status) in enumerate(log) if method == "PUT" and "/lfs-upload/" in path]
    closed = {
        path.rsplit("/", 1)[1]: i for i, (_, path, _) in enumerate(log) if path.startswith("/hook/closed/")
    }
    assert puts[0] < closed[shards[-1]]
    assert len(puts) == len(shards)  # each shard once; the side files are small, inline in the commit
    # One commit, after every upload, with exactly the files and bytes of the plain push.
    commit_posts = [i for i, (method, path, _) in enumerate(log) if method == "POST" and "/commit/" in path]
    assert len(commit_posts) == 1 and commit_posts[0] > max(puts)
    assert [c.summary for c in commits] == [c.summary for c in plain_commits] and commits[
        0
    ].summary == SUMMARY
    assert len(commits) == 2  # the repo's first commit (.gitattributes), then the merge
    assert files == plain_files
    assert {name: files[name] for name in shards} == _shards(pool / "reference")
    # The local output is complete, as without streaming.
    assert _shards(tmp_path / "streamed" / "out") == _shards(pool / "reference")


@pytest.mark.slow  # merges with the engine traced (`_traced`)
def test_delete_uploaded_keeps_two_shards_on_disk_and_commits_from_hashes_alone(
    hub: LocalHub, pool: Path, tmp_path: Path
) -> None:
    """The commit is made after every shard was deleted locally: it needs only their sha256 and size."""
    recipe = _recipe(tmp_path, "user/small-disk", RECIPE.replace("./", f"{pool}/"))
    out = tmp_path / "out"
    code, result = _traced(hub, recipe, out, hold_first_upload=True, delete_uploaded=True)
    assert code == 0, result
    events = result["events"]
    assert len(events) >= 4
    assert max(len(e["before"]) for e in events) <= 2  # the shard just closed, and the one uploading
    assert all(len(e["after"]) <= 1 for e in events)  # the previous one is stored, then deleted
    assert len(events[1]["before"]) == 2  # the first shard, still uploading (held), and the second
    files = hub.files("user/small-disk")
    reference = _shards(pool / "reference")
    assert {name: files[name] for name in reference} == reference
    # The folder keeps the side files and a lock recording the shards it no longer holds.
    assert _shards(out) == {}
    lock = json.loads((out / "hubmerge.lock.json").read_text())
    ref_lock = json.loads((pool / "reference" / "hubmerge.lock.json").read_text())
    assert {n: lock["output"]["files"][n] for n in reference} == {
        n: ref_lock["output"]["files"][n] for n in reference
    }
    assert files["hubmerge.lock.json"] == (out / "hubmerge.lock.json").read_bytes()
    # A rerun takes that folder for its own output, and an identical result makes no new commit.
    commits = len(hub.commits("user/small-disk"))
    code, again = _traced(hub, recipe, out, delete_uploaded=True)
    assert code == 0, again
    assert len(hub.commits("user/small-disk")) == commits


@pytest.mark.slow  # merges with the engine traced (`_traced`)
def test_ties_deleting_uploaded_shards_settles_the_majority_sign_first_and_keeps_two_on_disk(
    hub: LocalHub, tmp_path: Path
) -> None:
    """With a negative majority, a plain TIES run rewrites closed shards at the end (`engine._Patches`);
    deleting uploaded shards, it reads the inputs once more before the merge instead, and each shard goes
    up once, final."""
    cancelling_pool(tmp_path, majority=-1, dtype=torch.float32)
    text = (
        'method = "ties"\nbase = "models/base"\nmodels = ["models/a", "models/b"]\n'
        '[parameters]\nscaling_factor = 1.0\nthreshold = 100\n[output]\nrepo = "user/ties"\nmax_shard_size = "8KB"\n'
    )
    recipe = _recipe(tmp_path, "user/ties", text)
    assert invoke_cli(recipe, "--no-push", "--output", tmp_path / "reference", "-q").returncode == 0
    reference = _shards(tmp_path / "reference")
    assert len(reference) >= 4
    since = len(hub.requests)
    code, result = _traced(hub, recipe, tmp_path / "out", hold_first_upload=True, delete_uploaded=True)
    assert code == 0, result
    events = result["events"]
    assert max(len(e["before"]) for e in events) <= 2 and len(events[1]["before"]) == 2
    assert all(len(e["after"]) <= 1 for e in events)
    log = _log(hub, since)
    puts = [path for method, path, _ in log if method == "PUT" and "/lfs-upload/" in path]
    assert len(puts) == len(reference)  # each shard once: none was rewritten after its upload
    files = hub.files("user/ties")
    assert {name: files[name] for name in reference} == reference
    assert _shards(tmp_path / "out") == {}


@pytest.mark.slow  # a real process, killed or signalled: only a process shows it
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
@pytest.mark.parametrize(
    ("moment", "hold"),
    [
        ("mid-merge, first shard uploading", ("/info/lfs/objects/batch", "POST")),
        ("merge done, side files going up", ("/api/validate-yaml", "POST")),
    ],
    ids=["during-merge", "during-final-upload"],
)
def test_a_run_killed_while_streaming_leaves_no_commit_and_a_rerun_makes_exactly_one(
    hub: LocalHub, pool: Path, tmp_path: Path, signum: int, moment: str, hold: tuple[str, str]
) -> None:
    repo = f"user/killed-{signum}-{'merge' if moment.startswith('mid') else 'final'}"
    hub.create_repo(repo)
    recipe = _recipe(tmp_path, repo, RECIPE.replace("./", f"{pool}/"))
    before = len(hub.commits(repo))
    held = hub.hold_next(hold[0], method=hold[1])
    process = start_cli(recipe, "--output", tmp_path / "out", "-q", env=hub_env(hub, tmp_path))
    try:
        assert held.arrived.wait(120), moment
        process.send_signal(signum)
        process.communicate(timeout=60)
    finally:
        held.release.set()
    assert process.returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 143)
    assert len(hub.commits(repo)) == before
    if moment.startswith("mid"):
        assert not (tmp_path / "out").exists()
    else:  # the local output was complete before the push began, as without streaming
        assert _shards(tmp_path / "out") == _shards(pool / "reference")

    rerun = invoke_cli(recipe, "--output", tmp_path / "out", "-q", env=hub_env(hub, tmp_path))
    assert rerun.returncode == 0, rerun.stderr
    commits = hub.commits(repo)
    assert len(commits) == before + 1 and commits[0].summary == SUMMARY
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert {name: data for name, data in hub.files(repo).items() if name != ".gitattributes"} == local


@pytest.mark.slow  # merges with the engine traced (`_traced`)
@pytest.mark.usefixtures("no_retry_waits")
def test_an_upload_cut_mid_way_stops_the_merge_with_one_line_and_no_commit(
    hub: LocalHub, tmp_path: Path
) -> None:
    for name, seed in (("base", 10), ("a", 11), ("b", 12)):  # weights no earlier test stored on this Hub
        write_checkpoint(tmp_path / name, random_state_dict(seed))
    hub.create_repo("user/cut-stream")
    recipe = _recipe(tmp_path, "user/cut-stream")
    before = len(hub.commits("user/cut-stream"))
    hub.drop_next(50, path_contains="/lfs-upload/", method="PUT")  # more than the client's retries
    try:
        code, result = _traced(hub, recipe, tmp_path / "out", delete_uploaded=True)
    finally:
        hub._faults.clear()
    assert code == 6
    first = result["events"][0]["closed"]
    assert result["error"] == (
        f"pushing to user/cut-stream failed (RuntimeError: Error while uploading '{first}' to the Hub.); "
        "re-run to retry"
    )
    assert len(result["events"]) <= 3  # the merge stopped instead of filling the disk
    assert len(hub.commits("user/cut-stream")) == before
    assert not (tmp_path / "out").exists()
