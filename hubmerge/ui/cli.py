"""`hubmerge ui`: its options, and what must be set before Gradio (and huggingface_hub) are imported."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import HubmergeError
from .service import Service, Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hubmerge ui",
        description="Serve the web app: a recipe editor with validation, the plan, merges with progress and "
        "cancel, the card, and the push to the Hub; with named API endpoints /validate, /plan and /merge.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument(
        "--public",
        action="store_true",
        help="public mode (automatic on a Hugging Face Space): read local folders only under --allow-root",
    )
    p.add_argument("--allow-root", type=Path, help="public mode: the one folder recipes may read models from")
    p.add_argument(
        "--work-dir",
        type=Path,
        help="where merges are written (default ./hubmerge-ui; on a Space with persistent storage /data/hubmerge-ui)",
    )
    p.add_argument(
        "--space-files",
        type=Path,
        metavar="DIR",
        help="write app.py, requirements.txt and README.md (Space metadata) for a CPU Hugging Face Space into "
        "DIR, then stop",
    )
    p.add_argument(
        "--space-source",
        metavar="GIT_URL",
        help="with --space-files: the commit the Space installs hubmerge from, "
        "git+https://github.com/OWNER/REPO@COMMIT",
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.space_files is not None:
        from .space import write_space_files

        for path in write_space_files(args.space_files, args.space_source):
            print(f"wrote {path}")
        print(
            f"upload them to a new Gradio Space: hf upload your-name/hubmerge {args.space_files} --repo-type space"
        )
        return 0
    on_space = bool(os.environ.get("SPACE_ID"))
    persistent = Path("/data")
    public = args.public or on_space or args.share
    if on_space and persistent.is_dir():
        # Before huggingface_hub is imported: the cache on the persistent disk, downloaded once.
        os.environ.setdefault("HF_HOME", str(persistent / "huggingface"))
    if public:
        # The server's own token (a Space secret) must not open its owner's private repos to every visitor.
        os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    work = args.work_dir or (
        persistent / "hubmerge-ui" if on_space and persistent.is_dir() else Path("hubmerge-ui")
    )
    work = work.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    # Gradio copies the files it serves into its cache: keep that inside the work folder too.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(work / "gradio-cache"))
    allowed = args.allow_root.expanduser().resolve() if args.allow_root else None
    try:
        from .app import serve
    except ModuleNotFoundError as exc:
        if exc.name != "gradio":
            raise
        raise HubmergeError('the web app needs Gradio: pip install "hubmerge[ui]"') from None
    # A Space whose README sets hf_oauth: true gets OAUTH_CLIENT_ID: visitors can sign in to push.
    oauth = on_space and bool(os.environ.get("OAUTH_CLIENT_ID"))
    serve(Service(Settings(work, public, allowed, oauth=oauth)), args.host, args.port, args.share)
    return 0
