"""The web app as a Hugging Face Space: the files `hubmerge ui --space-files` writes, and the push of a visitor
who signed in with Hugging Face (Gradio's OAuth), against the local test Hub.

The push runs the app's own Push handler through Gradio's dispatch (`Blocks.process_api` with the visitor's
`gr.OAuthToken`, as Gradio injects it from the OAuth session on a Space) in a process whose environment is a
Space's with `hf_oauth: true` (SPACE_ID, OAUTH_*), pointed at the local Hub; huggingface_hub reads its endpoint
at import, hence the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from support.checkpoints import REPO, TINY
from support.hub import hub_env, local_hub
from support.hubserver import LocalHub

from hubmerge.cli import main
from hubmerge.ui.space import OAUTH_SCOPES

VISITOR_TOKEN = "hf_oauth_visitor_7d2c91"  # a token no other test uses, searched for everywhere afterwards
SOURCE = "git+https://github.com/someone/hubmerge@3f2a9c1d0b7e6a5f4e3d2c1b0a9f8e7d6c5b4a39"

# The Space's side of one visit: merge the tiny demo, then push it with the visitor's OAuth token (first with
# none, which is refused); prints what the page would show.
_VISIT = r"""
import asyncio, json, os, sys
from pathlib import Path

import gradio as gr

from hubmerge.ui.app import build
from hubmerge.ui.service import Service, Settings

work, tiny, recipe, repo = sys.argv[1:]
service = Service(Settings(Path(work), public=True, allowed_root=Path(tiny), oauth=True))
job = service.submit(Path(recipe).read_text(), recipe, "visitor")
job.finished.wait()
assert job.state == "done", job.error
demo = build(service)
push = next(f for f in demo.fns.values() if f.name == "push")
request = gr.Request(session_hash="visitor")


def press(token):
    oauth = gr.OAuthToken(token=token, scope="openid profile write-repos manage-repos", expires_at=0) if token else None
    try:
        out = asyncio.run(
            demo.process_api(push, ["", repo, True], request=request, session_hash="visitor", oauth_token=oauth)
        )
        return out["data"]
    except gr.Error as exc:
        return "error: " + exc.message


shown = {
    "login": sum(isinstance(b, gr.LoginButton) for b in demo.blocks.values()),
    "signed_out": press(None),
    "signed_in": press(os.environ.pop("VISITOR_TOKEN")),
    "output": str(job.result.output_dir),
}
print(json.dumps(shown))
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub() as server:
        server.add_user("visitor", VISITOR_TOKEN)
        yield server


@pytest.mark.slow
def test_a_visitor_signed_in_with_hugging_face_pushes_with_their_oauth_token(
    hub: LocalHub, tmp_path: Path
) -> None:
    space = {
        "SYSTEM": "spaces",  # Gradio tells a Space by it
        "SPACE_ID": "someone/hubmerge",
        "OAUTH_CLIENT_ID": "client-id",
        "OAUTH_CLIENT_SECRET": "client-secret",
        "OAUTH_SCOPES": "openid profile " + " ".join(OAUTH_SCOPES),
        "OPENID_PROVIDER_URL": hub.url,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",  # as `hubmerge ui` sets it in public mode
        "HUBMERGE_NO_SANITY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "VISITOR_TOKEN": VISITOR_TOKEN,
        "PYTHONPATH": str(REPO),
    }
    env = {**os.environ, **hub_env(hub, tmp_path, token="", **space)}
    recipe = REPO / "recipes" / "examples" / "tiny-ties.toml"
    work = tmp_path / "work"
    visit = subprocess.run(
        [sys.executable, "-c", _VISIT, str(work), str(TINY), str(recipe), "visitor/signed-in"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert visit.returncode == 0, visit.stderr
    shown = json.loads(visit.stdout.splitlines()[-1])
    assert shown["login"] == 1  # the "Sign in with Hugging Face" button beside the token field
    assert shown["signed_out"] == (
        "error: sign in with Hugging Face or paste a Hugging Face write token to push (it is used for this push "
        "only)"
    )
    cleared, message = shown["signed_in"]
    assert cleared == "" and message.startswith(f"pushed to [{hub.url}/visitor/signed-in/commit/")
    output = Path(shown["output"])
    pushed = hub.files("visitor/signed-in")
    assert pushed["model.safetensors"] == (output / "model.safetensors").read_bytes()
    assert hub._repos["visitor/signed-in"].private
    # The OAuth token is in no output, no log, and no file the app or the Hub client wrote.
    assert VISITOR_TOKEN not in visit.stdout + visit.stderr
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and VISITOR_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_space_files_are_a_gradio_space_with_sign_in_that_installs_hubmerge_from_a_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ast

    import gradio

    folder = tmp_path / "space"
    assert main(["ui", "--space-files", str(folder), "--space-source", SOURCE]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    meta = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == gradio.__version__
    assert meta["hf_oauth"] is True
    assert {"write-repos", "manage-repos"} <= set(meta["hf_oauth_scopes"])  # push, and create the repo
    lines = [
        line
        for line in (folder / "requirements.txt").read_text().splitlines()
        if line and not line.startswith(("#", "--"))
    ]
    requirements = {r.name: r for r in map(Requirement, lines)}
    assert set(requirements) == {"torch", "hubmerge", "gradio"}
    hubmerge = requirements["hubmerge"]
    assert hubmerge.url == SOURCE and hubmerge.extras == {"ui", "plots", "search", "eval"}
    assert requirements["gradio"].extras == {"oauth"}
    assert str(requirements["gradio"].specifier) == f"=={gradio.__version__}"
    app = ast.parse((folder / "app.py").read_text())
    calls = [n for n in ast.walk(app) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "main"]
    assert [ast.literal_eval(c.args[0]) for c in calls] == [["ui", "--host", "0.0.0.0", "--port", "7860"]]
    # Never over files already there.
    capsys.readouterr()
    (folder / "app.py").write_text("# mine\n")
    assert main(["ui", "--space-files", str(folder), "--space-source", SOURCE]) == 1
    assert capsys.readouterr().err == (
        f"hubmerge: error: {folder} already has app.py, requirements.txt, README.md; choose an empty folder "
        "for --space-files\n"
    )
    assert (folder / "app.py").read_text() == "# mine\n"


@pytest.mark.parametrize(
    ("args", "start"),
    [
        ((), "--space-files needs a git URL"),
        (("--space-source", "hubmerge==0.1.0"), "'hubmerge==0.1.0' is not a git URL"),
        (
            ("--space-source", "git+https://github.com/someone/hubmerge"),
            "'git+https://github.com/someone/hubmerge' is not",
        ),
    ],
)
def test_space_files_need_a_commit_to_install_hubmerge_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], start: str
) -> None:
    assert main(["ui", "--space-files", str(tmp_path / "space"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hubmerge: error: {start}") and err.count("\n") == 1
    assert err.rstrip().endswith("give --space-source git+https://github.com/OWNER/REPO@COMMIT")
    assert not (tmp_path / "space").exists()
