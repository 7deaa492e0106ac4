"""Tests for the local Hub (`tests/support/hubserver/`), driven by the real `huggingface_hub` client.

The client reads `HF_ENDPOINT` once, at import time, so every client call runs in a fresh interpreter
(`run_client`) whose environment points at the server, disables Xet (see the hubserver docstring) and routes
any other host to a dead proxy, so that a stray request to the real Hub fails at once instead of leaving
the machine. A few protocol details the client never exercises are checked over raw HTTP.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save, save_file
from support.hubserver import LocalHub, git_blob_sha1

ALICE = "hf_alice_token"
BOB = "hf_bob_token"
SEEDED = "alice/seeded"

# The header of this file is larger than the first 100 000 bytes the client reads, so parsing it takes a
# second ranged request.
SEEDED_WEIGHTS = save(
    {
        "embed.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "norm.weight": np.ones(4, dtype=np.float16),
    },
    metadata={"format": "pt", "padding": "x" * 120_000},
)
SEEDED_README = b"---\nlicense: apache-2.0\nlibrary_name: transformers\ntags:\n- merge\n---\n# Seeded\n"

CLIENT_PRELUDE = """
import json, sys
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
ARGS = json.loads(sys.argv[1])
api = HfApi()

def emit(value):
    print(json.dumps(value))
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with LocalHub() as local_hub:
        local_hub.add_user("alice", ALICE, orgs=("lab",))
        local_hub.add_user("bob", BOB)
        yield local_hub
        assert local_hub.server_errors == []


@pytest.fixture(scope="module")
def seeded(hub: LocalHub) -> dict[str, str]:
    """alice/seeded: v1 on main (tagged v1.0), a `dev` branch from v1, then main moves to v2."""
    hub.create_repo(SEEDED)
    v1 = hub.commit(
        SEEDED,
        {"config.json": b'{"v": 1}', "model.safetensors": SEEDED_WEIGHTS, "README.md": SEEDED_README},
        "v1",
    )
    hub.create_tag(SEEDED, "v1.0", v1)
    hub.create_branch(SEEDED, "dev", v1)
    dev = hub.commit(SEEDED, {"config.json": b'{"v": "dev"}'}, "dev change", branch="dev")
    v2 = hub.commit(SEEDED, {"config.json": b'{"v": 2}'}, "v2")
    return {"v1": v1, "dev": dev, "v2": v2}


def run_client(hub: LocalHub, home: Path, script: str, args: Any = None, offline: bool = False) -> Any:
    """Run `script` as alice with the real client in a subprocess; return the JSON value it `emit`s last."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("HF_", "HUGGING_FACE")) and not k.upper().endswith("_PROXY")
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_TOKEN=ALICE,
        NO_PROXY="127.0.0.1,localhost",
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_PRELUDE + textwrap.dedent(script), json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a safety net against a hung client, not a timing assumption
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_model_folder(folder: Path, seed: int) -> dict[str, bytes]:
    """A model folder (weights, README with metadata, json files, a subfolder); return its files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((8, 8)).astype(np.float32)}, folder / "model.safetensors")
    files = {
        "README.md": b"---\nlicense: apache-2.0\nbase_model:\n- Qwen/Qwen2.5-1.5B\n---\n# Merge\n",
        "config.json": json.dumps({"model_type": "qwen2", "seed": seed}).encode(),
        "generation_config.json": b'{"do_sample": false}',
        "tokenizer/tokenizer_config.json": b'{"model_max_length": 4096}',
    }
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    files["model.safetensors"] = (folder / "model.safetensors").read_bytes()
    return files


def requests_since(hub: LocalHub, start: int) -> list[tuple[str, str, int]]:
    return [(r.method, r.path, r.status) for r in hub.requests[start:]]


# ---------------------------------------------------------------------- accounts and repos


@pytest.mark.slow
def test_whoami_reports_user_and_orgs_and_rejects_unknown_tokens(hub: LocalHub, tmp_path: Path) -> None:
    result = run_client(
        hub,
        tmp_path,
        """
        me = api.whoami()
        try:
            api.whoami(token="hf_not_a_token")
            bad = None
        except HfHubHTTPError as err:
            bad = err.response.status_code
        emit({"name": me["name"], "orgs": [o["name"] for o in me["orgs"]], "bad": bad})
        """,
    )
    assert result == {"name": "alice", "orgs": ["lab"], "bad": 401}


@pytest.mark.slow
def test_create_repo_private_with_exist_ok_twice(hub: LocalHub, tmp_path: Path) -> None:
    result = run_client(
        hub,
        tmp_path,
        """
        first = api.create_repo("alice/private-merge", private=True, exist_ok=True)
        second = api.create_repo("alice/private-merge", private=True, exist_ok=True)
        try:
            api.create_repo("alice/private-merge")
            conflict = None
        except HfHubHTTPError as err:
            conflict = err.response.status_code
        org = api.create_repo("lab/org-merge")
        emit({
            "first": str(first), "second": str(second), "repo_id": first.repo_id, "conflict": conflict,
            "private": api.model_info("alice/private-merge").private, "org": org.repo_id,
        })
        """,
    )
    assert result == {
        "first": f"{hub.url}/alice/private-merge",
        "second": f"{hub.url}/alice/private-merge",
        "repo_id": "alice/private-merge",
        "conflict": 409,
        "private": True,
        "org": "lab/org-merge",
    }
    # Like the Hub, a new repo starts with one commit holding .gitattributes.
    assert list(hub.files("alice/private-merge")) == [".gitattributes"]
    assert [c.summary for c in hub.commits("alice/private-merge")] == ["initial commit"]


# ---------------------------------------------------------------------- uploads


@pytest.mark.slow
def test_upload_folder_then_snapshot_download_roundtrip(hub: LocalHub, tmp_path: Path) -> None:
    local = write_model_folder(tmp_path / "model", seed=1)
    start = len(hub.requests)
    result = run_client(
        hub,
        tmp_path / "home",
        """
        api.create_repo("alice/roundtrip")
        info = api.upload_folder(repo_id="alice/roundtrip", folder_path=ARGS, commit_message="merge v1")
        path = snapshot_download("alice/roundtrip")
        emit({"oid": info.oid, "url": info.commit_url, "path": path})
        """,
        args=str(tmp_path / "model"),
    )
    head = hub.head("alice/roundtrip")
    assert result["oid"] == head
    assert result["url"] == f"{hub.url}/alice/roundtrip/commit/{head}"
    assert hub.commits("alice/roundtrip")[0].summary == "merge v1"
    expected = {".gitattributes": hub.files("alice/roundtrip")[".gitattributes"], **local}
    assert hub.files("alice/roundtrip") == expected

    snapshot = Path(result["path"])
    assert snapshot.name == head
    downloaded = {
        p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()
    }
    assert downloaded == expected
    # The cache names blobs by sha256 for LFS files and by git sha1 for the others.
    blobs = snapshot.parent.parent / "blobs"
    assert (blobs / hashlib.sha256(local["model.safetensors"]).hexdigest()).is_file()
    assert (blobs / git_blob_sha1(local["config.json"])).is_file()

    calls = requests_since(hub, start)
    # The weights went through LFS basic: batch, PUT to the capability URL, verify; nothing through Xet.
    assert ("POST", "/alice/roundtrip.git/info/lfs/objects/batch", 200) in calls
    assert [status for method, _, status in calls if method == "PUT"] == [200]
    assert ("POST", "/alice/roundtrip.git/info/lfs/verify", 200) in calls
    assert ("POST", "/api/validate-yaml", 200) in calls
    assert not [c for c in calls if "xet" in c[1]]


@pytest.mark.slow
def test_upload_folder_create_pr_leaves_branch_untouched(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("alice/pr-target")
    main_before = hub.commit("alice/pr-target", {"config.json": b'{"v": 1}'}, "base")
    write_model_folder(tmp_path / "model", seed=2)
    result = run_client(
        hub,
        tmp_path / "home",
        """
        info = api.upload_folder(
            repo_id="alice/pr-target", folder_path=ARGS, create_pr=True, commit_message="Add merge"
        )
        pr_file = hf_hub_download("alice/pr-target", "config.json", revision=info.pr_revision)
        refs = api.list_repo_refs("alice/pr-target", include_pull_requests=True)
        emit({
            "pr_url": info.pr_url, "pr_revision": info.pr_revision, "pr_num": info.pr_num, "oid": info.oid,
            "pr_config": open(pr_file, "rb").read().decode(),
            "pr_refs": [[r.ref, r.target_commit] for r in refs.pull_requests],
        })
        """,
        args=str(tmp_path / "model"),
    )
    assert hub.head("alice/pr-target") == main_before
    assert result["pr_url"] == f"{hub.url}/alice/pr-target/discussions/1"
    assert result["pr_revision"] == "refs/pr/1"
    assert result["pr_num"] == 1
    assert hub.head("alice/pr-target", "refs/pr/1") == result["oid"]
    assert result["pr_refs"] == [["refs/pr/1", result["oid"]]]
    assert json.loads(result["pr_config"]) == {"model_type": "qwen2", "seed": 2}
    assert hub.commits("alice/pr-target", "refs/pr/1")[1].sha == main_before
    [pull] = hub.pull_requests("alice/pr-target")
    assert (pull.num, pull.title, pull.base_branch, pull.ref) == (1, "Add merge", "main", "refs/pr/1")


@pytest.mark.slow
def test_create_pull_request_then_commit_to_its_ref(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("alice/discussion")
    main = hub.head("alice/discussion")
    result = run_client(
        hub,
        tmp_path,
        """
        pr = api.create_pull_request("alice/discussion", title="Try a merge", description="details")
        info = api.upload_file(
            path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="alice/discussion",
            revision=pr.git_reference,
        )
        emit({
            "num": pr.num, "ref": pr.git_reference, "is_pr": pr.is_pull_request, "target": pr.target_branch,
            "oid": info.oid,
        })
        """,
    )
    assert result["num"] == 1
    assert result["ref"] == "refs/pr/1"
    assert result["is_pr"] is True
    assert result["target"] == "refs/heads/main"
    assert hub.head("alice/discussion", "refs/pr/1") == result["oid"]
    assert hub.files("alice/discussion", "refs/pr/1")["notes.txt"] == b"hello"
    assert hub.head("alice/discussion") == main


@pytest.mark.slow
def test_upload_to_a_new_branch(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("alice/branchy")
    main = hub.head("alice/branchy")
    local = write_model_folder(tmp_path / "model", seed=3)
    result = run_client(
        hub,
        tmp_path / "home",
        """
        api.create_branch("alice/branchy", branch="candidate")
        try:
            api.create_branch("alice/branchy", branch="candidate")
            again = None
        except HfHubHTTPError as err:
            again = err.response.status_code
        info = api.upload_folder(repo_id="alice/branchy", folder_path=ARGS, revision="candidate")
        refs = api.list_repo_refs("alice/branchy")
        branches = sorted([r.name, r.target_commit] for r in refs.branches)
        emit({"oid": info.oid, "again": again, "branches": branches})
        """,
        args=str(tmp_path / "model"),
    )
    assert result["again"] == 409
    assert hub.head("alice/branchy") == main
    assert hub.head("alice/branchy", "candidate") == result["oid"]
    assert result["branches"] == [["candidate", result["oid"]], ["main", main]]
    assert {
        p: c for p, c in hub.files("alice/branchy", "candidate").items() if p != ".gitattributes"
    } == local


@pytest.mark.slow
def test_reuploading_identical_content_creates_no_commit(hub: LocalHub, tmp_path: Path) -> None:
    write_model_folder(tmp_path / "model", seed=4)
    script = """
    api.create_repo("alice/noop", exist_ok=True)
    info = api.upload_folder(repo_id="alice/noop", folder_path=ARGS)
    emit({"oid": info.oid, "commits": [c.commit_id for c in api.list_repo_commits("alice/noop")]})
    """
    first = run_client(hub, tmp_path / "home", script, args=str(tmp_path / "model"))
    start = len(hub.requests)
    second = run_client(hub, tmp_path / "home", script, args=str(tmp_path / "model"))
    assert second["oid"] == first["oid"] == hub.head("alice/noop")
    assert second["commits"] == first["commits"] == [c.sha for c in hub.commits("alice/noop")]
    assert len(first["commits"]) == 2
    calls = requests_since(hub, start)
    # Preupload reported the remote oids, so the client skipped every file: no upload and no commit call.
    assert not [c for c in calls if c[0] == "PUT" or "/commit/" in c[1]]


# ---------------------------------------------------------------------- downloads


@pytest.mark.slow
def test_hf_hub_download_at_branch_tag_and_sha(hub: LocalHub, seeded: dict[str, str], tmp_path: Path) -> None:
    revisions = ["main", "dev", "v1.0", seeded["v1"], seeded["dev"][:7]]
    result = run_client(
        hub,
        tmp_path,
        """
        paths = [hf_hub_download(ARGS["repo"], "config.json", revision=rev) for rev in ARGS["revs"]]
        emit([open(path).read() for path in paths])
        """,
        args={"repo": SEEDED, "revs": revisions},
    )
    assert [json.loads(c)["v"] for c in result] == [2, "dev", 1, 1, "dev"]
    refs = tmp_path / "hub" / "models--alice--seeded" / "refs"
    assert (refs / "main").read_text() == seeded["v2"]
    assert (refs / "v1.0").read_text() == seeded["v1"]


def test_model_info_files_metadata(hub: LocalHub, seeded: dict[str, str], tmp_path: Path) -> None:
    result = run_client(
        hub,
        tmp_path,
        """
        info = api.model_info(ARGS, files_metadata=True)
        emit({
            "sha": info.sha, "tags": info.tags, "license": info.card_data.license,
            "siblings": {
                s.rfilename: [s.size, s.blob_id, s.lfs and [s.lfs.sha256, s.lfs.size]] for s in info.siblings
            },
        })
        """,
        args=SEEDED,
    )
    assert result["sha"] == seeded["v2"]
    assert result["license"] == "apache-2.0"
    assert result["tags"] == ["merge"]
    siblings = result["siblings"]
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    assert siblings["config.json"] == [8, git_blob_sha1(b'{"v": 2}'), None]
    size, blob_id, lfs = siblings["model.safetensors"]
    assert size == len(SEEDED_WEIGHTS)
    assert lfs == [hashlib.sha256(SEEDED_WEIGHTS).hexdigest(), len(SEEDED_WEIGHTS)]
    assert blob_id != git_blob_sha1(SEEDED_WEIGHTS)  # an LFS file's git oid is that of its pointer


def test_get_safetensors_metadata_reads_only_header_ranges(
    hub: LocalHub, seeded: dict[str, str], tmp_path: Path
) -> None:
    start = len(hub.requests)
    result = run_client(
        hub,
        tmp_path,
        """
        meta = api.get_safetensors_metadata(ARGS)
        file_meta = meta.files_metadata["model.safetensors"]
        emit({
            "sharded": meta.sharded, "weight_map": meta.weight_map,
            "padding": len(file_meta.metadata["padding"]),
            "tensors": {k: [t.dtype, t.shape] for k, t in file_meta.tensors.items()},
            "parameters": file_meta.parameter_count,
        })
        """,
        args=SEEDED,
    )
    assert result == {
        "sharded": False,
        "weight_map": {"embed.weight": "model.safetensors", "norm.weight": "model.safetensors"},
        "padding": 120_000,
        "tensors": {"embed.weight": ["F32", [3, 4]], "norm.weight": ["F16", [4]]},
        "parameters": {"F32": 12, "F16": 4},
    }
    gets = [r for r in hub.requests[start:] if r.method == "GET" and r.path.endswith(".safetensors")]
    header_size = int.from_bytes(SEEDED_WEIGHTS[:8], "little")
    assert [(r.status, r.range) for r in gets] == [
        (206, "bytes=0-100000"),
        (206, f"bytes=8-{header_size + 7}"),
    ]

    def is_weights(path: str) -> bool:
        return path.endswith(".safetensors")

    assert hub.bytes_served(is_weights, include_ranges=False, since=start) == 0
    assert hub.bytes_served(is_weights, since=start) == 100_001 + header_size


def test_errors_map_to_client_exceptions(hub: LocalHub, seeded: dict[str, str], tmp_path: Path) -> None:
    hub.create_repo("alice/secret", private=True)
    hub.create_repo("alice/gated", gated=True)
    hub.commit("alice/gated", {"config.json": b"{}"}, "add config")
    hub.create_repo("bob/own")
    result = run_client(
        hub,
        tmp_path,
        """
        cases = {
            "missing_repo": lambda: hf_hub_download("alice/nope", "config.json"),
            "missing_repo_info": lambda: api.model_info("alice/nope"),
            "private_anonymous": lambda: api.model_info("alice/secret", token=False),
            "private_other_user": lambda: api.model_info("alice/secret", token=ARGS["bob"]),
            "gated_anonymous": lambda: hf_hub_download("alice/gated", "config.json", token=False),
            "missing_revision": lambda: hf_hub_download(ARGS["repo"], "config.json", revision="nope"),
            "missing_file": lambda: hf_hub_download(ARGS["repo"], "no-such-file.json"),
            "other_namespace_upload": lambda: api.upload_file(
                path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="bob/own"),
            "other_namespace_create": lambda: api.create_repo("bob/mine"),
            "anonymous_upload": lambda: api.upload_file(
                path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/seeded", token=False),
        }
        outcome = {}
        for name, call in cases.items():
            try:
                call()
                outcome[name] = "no error"
            except Exception as err:
                response = getattr(err, "response", None)
                outcome[name] = [type(err).__name__, response.status_code if response is not None else None]
        outcome["gated_with_token"] = open(hf_hub_download("alice/gated", "config.json")).read()
        emit(outcome)
        """,
        args={"repo": SEEDED, "bob": BOB},
    )
    assert result == {
        "missing_repo": ["RepositoryNotFoundError", 404],
        "missing_repo_info": ["RepositoryNotFoundError", 404],
        "private_anonymous": ["RepositoryNotFoundError", 404],
        "private_other_user": ["RepositoryNotFoundError", 404],
        "gated_anonymous": ["GatedRepoError", 401],
        "missing_revision": ["RevisionNotFoundError", 404],
        "missing_file": ["RemoteEntryNotFoundError", 404],
        "other_namespace_upload": ["HfHubHTTPError", 403],
        "other_namespace_create": ["HfHubHTTPError", 403],
        "anonymous_upload": ["HfHubHTTPError", 401],
        "gated_with_token": "{}",
    }
    assert list(hub.files("bob/own")) == [".gitattributes"]


@pytest.mark.slow
def test_transient_500s_on_download_are_retried(
    hub: LocalHub, seeded: dict[str, str], tmp_path: Path
) -> None:
    # The first HEAD is not retried, the client then retries it with backoff (1 s): two faults cost 1 s.
    path = f"/{SEEDED}/resolve/main/README.md"
    hub.fail_next(2, 500, path_contains=path)
    start = len(hub.requests)
    script = "emit(open(hf_hub_download(ARGS, 'README.md'), 'rb').read().decode())"
    result = run_client(hub, tmp_path, script, SEEDED)
    assert result.encode() == SEEDED_README
    assert [c for c in requests_since(hub, start) if c[1] == path] == [
        ("HEAD", path, 500),
        ("HEAD", path, 500),
        ("HEAD", path, 200),
        ("GET", path, 200),
    ]


@pytest.mark.slow
def test_dropped_download_connection_is_resumed(
    hub: LocalHub, seeded: dict[str, str], tmp_path: Path
) -> None:
    path = f"/{SEEDED}/resolve/v1.0/config.json"
    hub.drop_next(1, path_contains=path, method="GET")
    start = len(hub.requests)
    script = "emit(open(hf_hub_download(ARGS, 'config.json', revision='v1.0')).read())"
    result = run_client(hub, tmp_path, script, SEEDED)
    assert json.loads(result) == {"v": 1}
    assert [c for c in requests_since(hub, start) if c[1] == path] == [
        ("HEAD", path, 200),
        ("GET", path, 0),  # 0: closed without an answer
        ("GET", path, 200),
    ]


@pytest.mark.slow
def test_offline_mode_serves_from_cache(hub: LocalHub, seeded: dict[str, str], tmp_path: Path) -> None:
    script = """
    path = snapshot_download(ARGS)
    emit({"path": path, "config": open(hf_hub_download(ARGS, "config.json")).read()})
    """
    online = run_client(hub, tmp_path, script, SEEDED)
    start = len(hub.requests)
    offline = run_client(hub, tmp_path, script, SEEDED, offline=True)
    assert offline == online
    assert json.loads(offline["config"]) == {"v": 2}
    assert Path(offline["path"]).name == seeded["v2"]
    assert hub.requests[start:] == []


# ---------------------------------------------------------------------- raw protocol details


def _call(
    hub: LocalHub,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, str], bytes]:
    port = int(hub.url.rsplit(":", 1)[1])
    connection = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    if conn is None:
        connection.close()
    return response.status, dict(response.getheaders()), data


AUTH = {"Authorization": f"Bearer {ALICE}"}


def test_resolve_headers_ranges_and_keep_alive(hub: LocalHub, seeded: dict[str, str]) -> None:
    port = int(hub.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    path = f"/{SEEDED}/resolve/main/model.safetensors"
    status, headers, body = _call(hub, "HEAD", path, conn=conn)
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == seeded["v2"]
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(SEEDED_WEIGHTS).hexdigest()}"'
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(SEEDED_WEIGHTS))
    assert "X-Xet-Hash" not in headers and "Content-Encoding" not in headers
    # Same connection: HTTP/1.1 keep-alive with exact lengths.
    status, headers, body = _call(hub, "GET", path, headers={"Range": "bytes=-4"}, conn=conn)
    size = len(SEEDED_WEIGHTS)
    assert (status, body) == (206, SEEDED_WEIGHTS[-4:])
    assert headers["Content-Range"] == f"bytes {size - 4}-{size - 1}/{size}"
    status, headers, _ = _call(hub, "GET", path, headers={"Range": f"bytes={size}-"}, conn=conn)
    assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")
    status, headers, _ = _call(hub, "HEAD", f"/{SEEDED}/resolve/main/config.json", conn=conn)
    config_oid = git_blob_sha1(b'{"v": 2}')
    assert headers["ETag"] == f'"{config_oid}"'
    assert "X-Linked-Etag" not in headers
    status, headers, _ = _call(hub, "HEAD", f"/{SEEDED}/resolve/dev/missing.txt", conn=conn)
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (
        404,
        "EntryNotFound",
        seeded["dev"],
    )
    conn.close()


def test_tree_lists_real_oids_without_xet(hub: LocalHub, seeded: dict[str, str]) -> None:
    status, _, body = _call(hub, "GET", f"/api/models/{SEEDED}/tree/v1.0?recursive=true&expand=true")
    assert status == 200
    entries = {e["path"]: e for e in json.loads(body)}
    assert entries["config.json"]["oid"] == git_blob_sha1(b'{"v": 1}')
    assert entries["config.json"]["lastCommit"]["id"] == seeded["v1"]
    assert entries["model.safetensors"]["lfs"]["oid"] == hashlib.sha256(SEEDED_WEIGHTS).hexdigest()
    assert all("xetHash" not in e for e in entries.values())


def test_write_route_errors(hub: LocalHub, seeded: dict[str, str]) -> None:
    status, _, body = _call(
        hub, "POST", "/api/repos/create", json.dumps({"name": "bad--name"}).encode(), AUTH
    )
    assert status == 400 and "--" in json.loads(body)["error"]
    status, _, body = _call(hub, "POST", "/api/repos/create", json.dumps({"name": "seeded"}).encode(), AUTH)
    assert (status, json.loads(body)["url"]) == (409, f"{hub.url}/{SEEDED}")
    status, headers, _ = _call(hub, "POST", "/api/repos/create", b"{}", {"Authorization": "Bearer nope"})
    assert (status, headers["X-Error-Message"]) == (401, "Invalid credentials in Authorization header")
    # validate-yaml answers JSON even when the metadata is broken.
    payload = json.dumps({"content": "---\nlicense: [unclosed\n---\n", "repoType": "model"}).encode()
    status, _, body = _call(hub, "POST", "/api/validate-yaml", payload)
    assert status == 400 and json.loads(body)["errors"][0]["message"]

    def commit(lines: list[dict[str, Any]]) -> tuple[int, bytes]:
        ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        headers = {**AUTH, "Content-Type": "application/x-ndjson"}
        status, _, body = _call(hub, "POST", f"/api/models/{SEEDED}/commit/main", ndjson, headers)
        return status, body

    header = {"key": "header", "value": {"summary": "s", "parentCommit": seeded["v1"]}}
    assert commit([header])[0] == 412
    lfs = {"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}
    assert commit([{"key": "header", "value": {"summary": "s"}}, lfs])[0] == 400
    assert hub.head(SEEDED) == seeded["v2"]

    # An upload URL only accepts the announced content.
    batch = {"operation": "upload", "objects": [{"oid": hashlib.sha256(b"abc").hexdigest(), "size": 3}]}
    lfs_headers = {**AUTH, "Content-Type": "application/vnd.git-lfs+json"}
    _, _, body = _call(
        hub, "POST", f"/{SEEDED}.git/info/lfs/objects/batch", json.dumps(batch).encode(), lfs_headers
    )
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    assert _call(hub, "PUT", href.removeprefix(hub.url), b"abd")[0] == 400
    assert _call(hub, "PUT", href.removeprefix(hub.url), b"abc")[0] == 200
    assert _call(hub, "PUT", href.removeprefix(hub.url), b"abc")[0] == 404
