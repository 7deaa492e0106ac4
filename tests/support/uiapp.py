"""`hubmerge ui` in a subprocess on 127.0.0.1, for the web app's tests (gradio_client and the browser).

Run as a script, this file is the server: `hubmerge ui` itself, plus one test hook. When the environment names
a pause file (HUBMERGE_TEST_PAUSE) and that file exists when a merge is about to write its second slice (the
first one written and reported), the merge removes it, writes the shard's path to `<pause file>.reached`, and
waits until the job is cancelled: a test cancels a merge that is provably midway (its staging folder holds a
partly written shard) without depending on timing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READY = "Running on local URL:"


@dataclass(frozen=True)
class Served:
    url: str
    work: Path  # the app's work folder
    log: Path  # the server's stdout and stderr
    pause: Path  # create this file to hold the next merge midway until it is cancelled

    @property
    def reached(self) -> Path:
        return self.pause.with_name(self.pause.name + ".reached")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """Start the app with its work folder, log and pause file in `folder`; stop it on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    served = Served(f"http://127.0.0.1:{port}/", folder / "work", folder / "server.log", folder / "pause")
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # this tree's hubmerge, whatever is installed
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HUBMERGE_NO_SANITY": "1",
        "HUBMERGE_TEST_PAUSE": str(served.pause),
        "NO_PROXY": "127.0.0.1,localhost",
        **(env or {}),
    }
    command = [sys.executable, __file__, "--host", "127.0.0.1", "--port", str(port)]
    with open(served.log, "w") as log:
        process = subprocess.Popen(
            [*command, "--work-dir", str(served.work), *args],
            cwd=folder,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180  # importing gradio and torch on a busy machine
        while READY not in served.log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hubmerge ui did not start:\n{served.log.read_text()}")
            time.sleep(0.2)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _install_pause(pause: Path) -> None:
    import threading

    from hubmerge import api
    from hubmerge.merging import engine

    cancelled: list[threading.Event] = []
    writes = [0]
    merge, write = api.merge, engine.ShardWriter.write

    def watched_merge(*args, **kwargs):  # type: ignore[no-untyped-def]
        cancelled[:] = [kwargs["cancel"]] if kwargs.get("cancel") is not None else []
        writes[0] = 0
        return merge(*args, **kwargs)

    def paused_write(self, tensor):  # type: ignore[no-untyped-def]
        writes[0] += 1
        if writes[0] == 2 and cancelled and pause.exists():
            pause.unlink()
            Path(f"{pause}.reached").write_text(str(self.path))
            cancelled[0].wait(120)
        write(self, tensor)

    api.merge = watched_merge  # type: ignore[assignment]
    engine.ShardWriter.write = paused_write  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from hubmerge.cli import main

    _install_pause(Path(os.environ["HUBMERGE_TEST_PAUSE"]))
    sys.exit(main(["ui", *sys.argv[1:]]))
