"""`hubmerge ui --space-files DIR`: the three files of a Hugging Face Space (Gradio SDK, CPU) serving the app.

The Space runs the app in public mode (`SPACE_ID` is set there): models come from the Hub only, merges are
written under the work folder, and with persistent storage (/data) the HF cache and the work folder go there.
Its README turns on "Sign in with Hugging Face" (`hf_oauth`, with the scopes to create and write the
visitor's repos). hubmerge is not on PyPI: requirements.txt installs it from a git commit (`source`).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..errors import HubmergeError

__all__ = ["write_space_files"]

_APP = '''"""hubmerge's web app as a Hugging Face Space (written by `hubmerge ui --space-files`)."""

import sys

from hubmerge.cli import main

sys.exit(main(["ui", "--host", "0.0.0.0", "--port", "7860"]))
'''

_REQUIREMENTS = """# CPU wheels of torch: a free CPU Space has no GPU.
--extra-index-url https://download.pytorch.org/whl/cpu
torch
# hubmerge from the commit given to `hubmerge ui --space-files DIR --space-source`.
{requirement}
# "Sign in with Hugging Face" (hf_oauth in README.md), at the Space's own Gradio version.
gradio[oauth]=={gradio}
"""

# What a visitor who signs in lets the app do with their account: create the repo (manage-repos) and push
# to it (write-repos); read-repos for their private sources.
OAUTH_SCOPES = ("read-repos", "write-repos", "manage-repos")
EXTRAS = "ui,plots,search,eval"  # everything the app offers: the page, the card's plots, Search, [eval]
_GIT = re.compile(r"^git\+https://[^\s@]+@[^\s@/]+$")

_README = """---
title: hubmerge
emoji: 🧬
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {gradio}
app_file: app.py
hf_oauth: true
hf_oauth_scopes:
{scopes}
pinned: false
license: apache-2.0
short_description: Merge Qwen2.5 checkpoints from a TOML recipe and push them
---

# hubmerge

Merge Qwen2.5 checkpoints from a TOML recipe on free CPU hardware: edit the recipe (checked as you type),
read the plan (shas, downloads, disk and memory), run the merge with live progress, read the model card with
its diagnostics plots, and push the result: sign in with Hugging Face, or paste a write token (either is
used for that push only, never kept). The Search tab runs the recipe's `[search]` trials.

This Space runs hubmerge {version}, installed from {source},
in public mode: models are read from the Hub by id (no local folders),
every merge is written under the app's work folder, and only a finished merge can be pushed. With persistent
storage enabled, the Hugging Face cache and the work folder live in `/data`, so sources are downloaded once.

Scripts can drive it with `gradio_client`: `/validate`, `/plan` and `/merge` take the recipe's TOML text.
"""


def requirement(source: str | None) -> str:
    """The requirements.txt line that installs hubmerge from `source`, a git URL pinned to a commit
    (`git+https://github.com/OWNER/REPO@COMMIT`)."""
    if source is None or not _GIT.match(source.strip()):
        given = f"{source!r} is not" if source is not None else "--space-files needs"
        raise HubmergeError(
            f"{given} a git URL pinned to a commit, which the Space installs hubmerge from (it is not on PyPI); "
            "give --space-source git+https://github.com/OWNER/REPO@COMMIT"
        )
    return f"hubmerge[{EXTRAS}] @ {source.strip()}"


def write_space_files(folder: Path, source: str | None) -> list[Path]:
    """Write app.py, requirements.txt and README.md (Space metadata) into `folder`, hubmerge installed from
    `source` (see `requirement`); never over a file."""
    line = requirement(source)
    try:
        gradio = metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise HubmergeError('the web app needs Gradio: pip install "hubmerge[ui]"') from None
    scopes = "\n".join(f"  - {scope}" for scope in OAUTH_SCOPES)
    files = {
        "app.py": _APP,
        "requirements.txt": _REQUIREMENTS.format(requirement=line, gradio=gradio),
        "README.md": _README.format(
            gradio=gradio, version=__version__, scopes=scopes, source=line.split(" @ ")[1]
        ),
    }
    present = [name for name in files if (folder / name).exists()]
    if present:
        raise HubmergeError(
            f"{folder} already has {', '.join(present)}; choose an empty folder for --space-files"
        )
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        with open(folder / name, "x", encoding="utf-8") as f:
            f.write(text)
        written.append(folder / name)
    return written
