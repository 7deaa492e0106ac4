"""The local Hub as the tests use it: users' tokens, the pool of Qwen repos, and the environment that points
`huggingface_hub` (in a `hubmerge` process or `support.cli.invoke_cli`) at a `support.hubserver.LocalHub`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from support.hubserver import LocalHub

TOKEN, OTHER_TOKEN = "hf_test_user_token", "hf_test_other_token"
POOL = {
    "Qwen/Qwen2.5-1.5B": "base",
    "Qwen/Qwen2.5-Math-1.5B": "math",
    "Qwen/Qwen2.5-Coder-1.5B": "coder",
    "Qwen/Qwen2.5-1.5B-Instruct": "instruct",
}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def hub_env(hub: LocalHub, tmp_path: Path, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": token or "",
    }
    return env | extra


@contextmanager
def local_hub(
    repos: Mapping[str, Path] | None = None, orgs: tuple[str, ...] = (), token: str = TOKEN
) -> Iterator[LocalHub]:
    """The tests' one Hub factory: a local Hub where `user` (`token`, member of `orgs`) may push, and each of
    `repos` holds one commit of the files of a checkpoint folder; each other owner (`Qwen`) is a user too, with
    token `hf_<owner>_token`. A test module's `hub` fixture enters it once (scope="module")."""
    repos = repos or {}
    with LocalHub() as server:
        server.add_user("user", token, orgs=orgs)
        for owner in sorted({repo.split("/")[0] for repo in repos} - {"user"}):
            server.add_user(owner, f"hf_{owner.lower()}_token")
        for repo, folder in repos.items():
            server.create_repo(repo)
            server.commit(repo, folder_files(folder), "Upload model")
        yield server
