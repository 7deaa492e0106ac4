"""`hubmerge ui --space-files DIR`: the three files of a Hugging Face Space (Gradio SDK, CPU) serving the app.

The Space runs the app in public mode (`SPACE_ID` is set there): models come from the Hub only, merges are
written under the work folder, and with persistent storage (/data) the HF cache and the work folder go there.
"""

from __future__ import annotations

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
hubmerge[ui,plots]=={version}
"""

_README = """---
title: hubmerge
emoji: 🧬
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {gradio}
app_file: app.py
pinned: false
license: apache-2.0
short_description: Merge Qwen2.5 checkpoints from a TOML recipe and push them
---

# hubmerge

Merge Qwen2.5 checkpoints from a TOML recipe on free CPU hardware: edit the recipe (checked as you type),
read the plan (shas, downloads, disk and memory), run the merge with live progress, read the model card with
its diagnostics plots, and push the result with your own write token (used for that push only, never kept).

This Space runs hubmerge {version} in public mode: models are read from the Hub by id (no local folders),
every merge is written under the app's work folder, and only a finished merge can be pushed. With persistent
storage enabled, the Hugging Face cache and the work folder live in `/data`, so sources are downloaded once.

Scripts can drive it with `gradio_client`: `/validate`, `/plan` and `/merge` take the recipe's TOML text.
"""


def write_space_files(folder: Path) -> list[Path]:
    """Write app.py, requirements.txt and README.md (Space metadata) into `folder`; never over a file."""
    try:
        gradio = metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise HubmergeError('the web app needs Gradio: pip install "hubmerge[ui]"') from None
    files = {
        "app.py": _APP,
        "requirements.txt": _REQUIREMENTS.format(version=__version__),
        "README.md": _README.format(gradio=gradio, version=__version__),
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
