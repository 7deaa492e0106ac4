"""`hubmerge ui --public` against the local Hub: Hub ids only, and the server's own token (a Space secret)
opens nothing to visitors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from support.checkpoints import TINY
from support.hub import hub_env, local_hub
from support.hubserver import LocalHub
from support.uiapp import Served, serve

OWNER_TOKEN = "hf_space_owner_secret"
FILES = {p.name: p.read_bytes() for p in (TINY / "base").iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub() as server:
        server.add_user("owner", OWNER_TOKEN)
        server.create_repo("owner/open")
        server.commit("owner/open", FILES, "Upload model")
        server.create_repo("owner/secret", private=True)
        server.commit("owner/secret", FILES, "Upload model")
        yield server


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, hub: LocalHub, known_hashes_store: Path
) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("ui-public")
    # the Space's secret: it can read owner/secret
    env = hub_env(hub, folder, token=OWNER_TOKEN, HUBMERGE_CACHE=str(known_hashes_store))
    with serve(folder, "--public", env=env) as served:
        yield served


def _recipe(model: str) -> str:
    return f'method = "task_arithmetic"\nbase = "owner/open"\nmodels = ["{model}"]\n'


@pytest.mark.slow
def test_public_app_reads_public_hub_repos_but_not_with_the_servers_token(app: Served, hub: LocalHub) -> None:
    client = Client(app.url, verbose=False)
    import json

    plan = json.loads(client.predict(_recipe("owner/open"), api_name="/plan"))
    assert [s["sha"] for s in plan["sources"]] == [hub.head("owner/open")] * 2
    with pytest.raises(AppError) as caught:
        client.predict(_recipe("owner/secret"), api_name="/plan")
    assert "owner/secret" in str(caught.value)
    assert not any(r.path.startswith("/api/models/owner/secret") and r.status == 200 for r in hub.requests)


@pytest.mark.slow
def test_public_app_refuses_local_folders(app: Served) -> None:
    client = Client(app.url, verbose=False)
    recipe = _recipe(str(TINY / "math"))
    assert client.predict(recipe, api_name="/validate") == (
        f"{app.work.parent / 'recipe.toml'}: '{TINY / 'math'}' is a local path, and this public app reads "
        'none; name models by their Hub id, such as "Qwen/Qwen2.5-1.5B"'
    )
    with pytest.raises(AppError, match="this public app reads none"):
        client.predict(recipe, api_name="/merge")
    assert not (app.work / "runs").exists() or list((app.work / "runs").iterdir()) == []
