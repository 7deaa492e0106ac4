"""Hub sources and publishing, end to end: the real `huggingface_hub` client (its settings read again from
the environment around each in-process call, `support.cli.process_like`) against the local Hub server in
`support/hubserver/`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load, save
from support.checkpoints import REPO, TINY
from support.cli import invoke_cli, process_like
from support.hub import OTHER_TOKEN, POOL, TOKEN, folder_files, hub_env, local_hub
from support.hubserver import LocalHub


def _scaled(weights: bytes, factor: float) -> bytes:
    return save(
        {k: (v.float() * factor).to(v.dtype) for k, v in load(weights).items()}, metadata={"format": "pt"}
    )


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    """Qwen/... repos holding the tiny checkpoints: commit 1 (tag v1.0) has halved weights, main the real ones."""
    with local_hub(orgs=("user-org",)) as server:
        server.add_user("other", OTHER_TOKEN)
        server.add_user("Qwen", "hf_qwen_token")
        for repo, name in POOL.items():
            server.create_repo(repo)
            files = folder_files(TINY / name)
            old = dict(files, **{"model.safetensors": _scaled(files["model.safetensors"], 0.5)})
            server.commit(repo, old, "Upload model")
            server.create_tag(repo, "v1.0")
            server.commit(repo, files, "Update weights")
        server.create_branch("Qwen/Qwen2.5-1.5B-Instruct", "dev", "v1.0")
        yield server


@pytest.mark.slow
def test_merge_pins_branch_tag_and_sha_then_pushes_private_repo(hub: LocalHub, tmp_path: Path) -> None:
    coder_v1 = hub.head("Qwen/Qwen2.5-Coder-1.5B", "v1.0")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'method = "ties"\nbase = "Qwen/Qwen2.5-1.5B@v1.0"\n'
        'models = ["Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-1.5B-Instruct@dev",\n'
        f'          {{source = "Qwen/Qwen2.5-Coder-1.5B", revision = "{coder_v1}"}}]\n'
        "[parameters]\nscaling_factor = 0.8\n"
        '[output]\ndir = "out"\nrepo = "user/merged"\nprivate = true\n'
    )
    commits_before = len(hub.commits("user/merged")) if "user/merged" in hub._repos else 0
    result = invoke_cli(recipe, env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"{hub.url}/user/merged/commit/" in result.stdout
    assert commits_before == 0

    lock = json.loads((tmp_path / "out" / "hubmerge.lock.json").read_text())
    shas = {s["role"]: s["sha"] for s in lock["sources"]}
    assert shas == {
        "base": hub.head("Qwen/Qwen2.5-1.5B", "v1.0"),
        "models[0]": hub.head("Qwen/Qwen2.5-Math-1.5B", "main"),
        "models[1]": hub.head("Qwen/Qwen2.5-1.5B-Instruct", "dev"),
        "models[2]": coder_v1,
    }
    # The weights equal a local merge of exactly those commits.
    for role, repo in (
        ("base", "Qwen/Qwen2.5-1.5B"),
        ("math", "Qwen/Qwen2.5-Math-1.5B"),
        ("instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
        ("coder", "Qwen/Qwen2.5-Coder-1.5B"),
    ):
        sha = {
            "base": shas["base"],
            "math": shas["models[0]"],
            "instruct": shas["models[1]"],
            "coder": coder_v1,
        }[role]
        folder = tmp_path / "local" / role
        folder.mkdir(parents=True)
        for name, data in hub.files(repo, sha).items():
            (folder / name).write_bytes(data)
    local = tmp_path / "local.toml"
    local.write_text(
        'method = "ties"\nbase = "./local/base"\nmodels = ["./local/math", "./local/instruct", "./local/coder"]\n'
        "[parameters]\nscaling_factor = 0.8\n"
    )
    assert invoke_cli(local, "--output", tmp_path / "local-out", "-q").returncode == 0
    assert (tmp_path / "local-out" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors"
    ).read_bytes()

    pushed = hub.files("user/merged")
    assert hub._repos["user/merged"].private
    for name in (
        "model.safetensors",
        "config.json",
        "hubmerge.lock.json",
        "hubmerge.toml",
        "tokenizer.json",
        "README.md",
        "merge_stats.json",  # the diagnostics and the plots the card links to go up with the model
        "merge_stats_norms.png",
        "merge_stats_cosine.png",
        "merge_stats_signs.png",
    ):
        assert pushed[name] == (tmp_path / "out" / name).read_bytes(), name
    assert hub.commits("user/merged")[0].summary == "hubmerge: recipe.toml (ties)"

    # A user downloads the pushed repo with the Hub client and loads it with transformers.
    with process_like(None, hub_env(hub, tmp_path / "user")):
        from huggingface_hub import snapshot_download
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(snapshot_download("user/merged"))
    assert sum(p.numel() for p in model.parameters()) == 107072

    # Same recipe, same sources: identical output, no new commit.
    n = len(hub.commits("user/merged"))
    again = invoke_cli(recipe, env=hub_env(hub, tmp_path))
    assert again.returncode == 0, again.stderr
    assert "no new commit" in again.stderr
    assert len(hub.commits("user/merged")) == n


def _tiny_hub_recipe(tmp_path: Path, output: str) -> Path:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'method = "task_arithmetic"\nbase = "Qwen/Qwen2.5-1.5B"\nmodels = ["Qwen/Qwen2.5-Math-1.5B"]\n'
        f'[output]\ndir = "out"\n{output}\n'
    )
    return recipe


@pytest.mark.slow
def test_push_as_pull_request_leaves_main_alone(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("user-org/pr-target")
    main = hub.head("user-org/pr-target")
    result = invoke_cli(
        _tiny_hub_recipe(tmp_path, 'repo = "user-org/pr-target"\ncreate_pr = true'),
        env=hub_env(hub, tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert f"{hub.url}/user-org/pr-target/discussions/1" in result.stdout
    assert hub.head("user-org/pr-target") == main
    assert "model.safetensors" in hub.files("user-org/pr-target", "refs/pr/1")
    assert [pr.num for pr in hub.pull_requests("user-org/pr-target")] == [1]


@pytest.mark.slow
def test_push_to_a_new_branch(hub: LocalHub, tmp_path: Path) -> None:
    result = invoke_cli(
        _tiny_hub_recipe(tmp_path, 'repo = "user/branched"\nbranch = "merge-v2"'), env=hub_env(hub, tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in hub.files("user/branched", "merge-v2")
    assert "model.safetensors" not in hub.files("user/branched", "main")


def test_plan_of_seed_recipe_reports_sizes_without_downloading_weights(hub: LocalHub, tmp_path: Path) -> None:
    start = len(hub.requests)
    result = invoke_cli(
        "plan",
        REPO / "recipes" / "qwen2.5-1.5b" / "three_models" / "ties.toml",
        "--json",
        env=hub_env(hub, tmp_path),
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    # The base and the three models, then the instruct model again as the tokenizer source (read once).
    assert [s["sha"] for s in plan["sources"]] == [hub.head(r) for r in POOL] + [hub.head(list(POOL)[-1])]
    assert [s["role"] for s in plan["sources"]][-1] == "tokenizer" and len(plan["downloads"]) == len(POOL)
    base = next(d for d in plan["downloads"] if d["source"].startswith("base"))
    expected = sum(
        len(data) for name, data in hub.files("Qwen/Qwen2.5-1.5B").items() if name in base["files"]
    )
    config_size = len(hub.files("Qwen/Qwen2.5-1.5B")["config.json"])
    assert base["bytes"] == expected and base["cached_bytes"] == config_size  # config.json was read to plan
    assert "model.safetensors" in base["files"] and "tokenizer.json" not in base["files"]
    assert "tokenizer.json" in plan["downloads"][-1]["files"]  # from the instruct model
    assert plan["output"]["tensors"] == 26 and plan["output"]["tie_word_embeddings"] is True
    # Headers came through range requests; no weight file was downloaded whole.
    assert hub.bytes_served(lambda p: p.endswith(".safetensors"), include_ranges=False, since=start) == 0


@pytest.mark.slow
def test_offline_mode_works_from_the_cache(hub: LocalHub, tmp_path: Path) -> None:
    recipe = _tiny_hub_recipe(tmp_path, "")
    assert invoke_cli(recipe, "-q", env=hub_env(hub, tmp_path)).returncode == 0
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    offline = invoke_cli(
        recipe,
        "-q",
        "--output",
        tmp_path / "out2",
        env=hub_env(hub, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"),
    )
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == first


def _fails(hub: LocalHub, tmp_path: Path, recipe_text: str, code: int, message: str, **env: str) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text + '[output]\ndir = "out"\n' + env.pop("output", ""))
    start = len(hub.requests)
    result = invoke_cli(recipe, env=hub_env(hub, tmp_path, **env))
    assert result.returncode == code, result.stderr
    assert message in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("hubmerge: error: ") and "Traceback" not in result.stderr
    assert all(line.startswith("warning: ") for line in lines[:-1])
    assert not (tmp_path / "out").exists()
    assert (
        hub.bytes_served(lambda p: p.endswith((".safetensors", ".bin")), include_ranges=False, since=start)
        == 0
    )


TA = 'method = "task_arithmetic"\nbase = "Qwen/Qwen2.5-1.5B"\n'


def test_missing_repo(hub: LocalHub, tmp_path: Path) -> None:
    _fails(
        hub,
        tmp_path,
        TA + 'models = ["Qwen/Qwen2.5-Nope-1.5B"]\n',
        3,
        "repository Qwen/Qwen2.5-Nope-1.5B not found",
    )


def test_private_repo_without_token_reads_as_not_found_with_login_hint(hub: LocalHub, tmp_path: Path) -> None:
    if "Qwen/secret" not in hub._repos:
        hub.create_repo("Qwen/secret", private=True)
    _fails(hub, tmp_path, TA + 'models = ["Qwen/secret"]\n', 3, "hf auth login", HF_TOKEN="")


def test_gated_repo_says_where_to_accept_the_terms(hub: LocalHub, tmp_path: Path) -> None:
    if "Qwen/gated" not in hub._repos:
        hub.create_repo("Qwen/gated", gated=True)
    _fails(
        hub,
        tmp_path,
        TA + 'models = ["Qwen/gated"]\n',
        3,
        f"accept its terms at {hub.url}/Qwen/gated",
        HF_TOKEN="",
    )


def test_missing_revision(hub: LocalHub, tmp_path: Path) -> None:
    _fails(
        hub,
        tmp_path,
        TA + 'models = ["Qwen/Qwen2.5-Math-1.5B@v9"]\n',
        3,
        "revision 'v9' not found in Qwen/Qwen2.5-Math-1.5B",
    )


def test_pickle_only_repo_is_refused_before_download(hub: LocalHub, tmp_path: Path) -> None:
    if "Qwen/pickled" not in hub._repos:
        hub.create_repo("Qwen/pickled")
        files = folder_files(TINY / "math")
        del files["model.safetensors"]
        hub.commit("Qwen/pickled", files | {"pytorch_model.bin": b"\x80\x04 pickle"}, "pickle")
    _fails(
        hub, tmp_path, TA + 'models = ["Qwen/pickled"]\n', 3, "has only pickle weights (pytorch_model.bin)"
    )


def test_network_down_with_nothing_cached(hub: LocalHub, tmp_path: Path) -> None:
    _fails(
        hub,
        tmp_path,
        TA + 'models = ["Qwen/Qwen2.5-Math-1.5B"]\n',
        3,
        "check your network",
        HF_ENDPOINT="http://127.0.0.1:9",
    )


def test_push_without_token_fails_before_merging(hub: LocalHub, tmp_path: Path) -> None:
    _fails(
        hub,
        tmp_path,
        TA + 'models = ["Qwen/Qwen2.5-Math-1.5B"]\n',
        6,
        "needs a Hugging Face token",
        HF_TOKEN="",
        output='repo = "user/never"\n',
    )
    assert "user/never" not in hub._repos


def test_push_to_foreign_namespace_fails_before_merging(hub: LocalHub, tmp_path: Path) -> None:
    _fails(
        hub,
        tmp_path,
        TA + 'models = ["Qwen/Qwen2.5-Math-1.5B"]\n',
        6,
        "cannot write to the namespace 'user'",
        HF_TOKEN=OTHER_TOKEN,
        output='repo = "user/never"\n',
    )


@pytest.mark.slow
def test_token_never_appears_in_outputs(hub: LocalHub, tmp_path: Path) -> None:
    recipe = _tiny_hub_recipe(tmp_path, 'repo = "user/tokencheck"')
    result = invoke_cli(recipe, env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    for path in (tmp_path / "out").iterdir():
        assert TOKEN.encode() not in path.read_bytes(), path.name


@pytest.mark.slow
@pytest.mark.usefixtures("no_retry_waits")
def test_transient_hub_faults_are_retried(hub: LocalHub, tmp_path: Path) -> None:
    """A dropped weight download resumes, and a 5xx burst on metadata is retried by the client."""
    hub.drop_next(1, path_contains="Qwen2.5-Math-1.5B/resolve", method="GET")
    hub.fail_next(1, status=503, path_contains="/api/models/Qwen/Qwen2.5-1.5B/revision")
    result = invoke_cli(_tiny_hub_recipe(tmp_path, ""), "-q", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    statuses = [(r.method, r.status) for r in hub.requests if "Qwen/Qwen2.5-1.5B/revision" in r.path]
    assert (("GET", 503) in statuses) and (("GET", 200) in statuses)


@pytest.mark.slow
def test_online_and_offline_resolution_pick_the_same_weight_files(hub: LocalHub, tmp_path: Path) -> None:
    """A repo with a stray extra *.safetensors beside model.safetensors, fully downloaded to the cache (as
    `hf download` does): online and offline plans read model.safetensors alone, as transformers does."""
    if "Qwen/consolidated" not in hub._repos:
        hub.create_repo("Qwen/consolidated")
        files = folder_files(TINY / "math")
        hub.commit(
            "Qwen/consolidated", files | {"consolidated.safetensors": files["model.safetensors"]}, "up"
        )
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TA + 'models = ["Qwen/consolidated"]\n')
    env = hub_env(hub, tmp_path)
    with process_like(None, env):
        from huggingface_hub import snapshot_download

        for repo in ("Qwen/consolidated", "Qwen/Qwen2.5-1.5B"):
            snapshot_download(repo)
    online = invoke_cli("plan", recipe, "--json", env=env)
    assert online.returncode == 0, online.stderr
    offline = invoke_cli(
        "plan",
        recipe,
        "--json",
        env=hub_env(hub, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"),
    )
    assert offline.returncode == 0, offline.stderr
    files = [json.loads(r.stdout)["downloads"][1]["files"] for r in (online, offline)]
    assert (
        files[0] == files[1]
        and "model.safetensors" in files[0]
        and "consolidated.safetensors" not in files[0]
    )
