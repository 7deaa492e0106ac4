"""docs/big-models.md's table: `hubmerge plan --json` for a base + 3 merge of every Qwen2.5 size.

The sources are Qwen2.5-shaped repos on the local test Hub (tests/support/qwen_shapes.py: real tensor names, shapes,
bf16 and shard counts; sparse shards, since a plan reads only headers). Each size is planned three times:
with disk to spare (every source cached), and within a GitHub runner's 14 GB with a push, for
task_arithmetic (one read of every input) and TIES with its global cut-off (three reads; four
when shards are uploaded as written, which settles the majority sign first).

    python bench/shaped_plans.py    # prints the Markdown table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.hubserver import LocalHub  # noqa: E402
from support.qwen_shapes import SHAPES, add_shaped_repos, recipe_text  # noqa: E402

TOKEN = "hf_bench_token"


def _plan(hub: LocalHub, home: Path, ids: list[str], method: str, max_disk: str) -> dict[str, Any]:
    recipe = home / f"{method}-{max_disk}.toml"
    recipe.write_text(recipe_text(ids, method, "user/merged"))
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home / "hf_home"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", "plan", str(recipe), "--json", "--max-disk", max_disk],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def main() -> None:
    rows = [
        "| Qwen2.5 | one source | cached: disk / memory / network | 14 GB runner: sources streamed | "
        "disk / memory | network, task_arithmetic / TIES |",
        "|---|---|---|---|---|---|",
    ]
    with LocalHub() as hub, tempfile.TemporaryDirectory() as tmp:
        hub.add_user("user", TOKEN)
        hub.add_user("shaped", "hf_shaped_token")
        for size in SHAPES:
            ids = add_shaped_repos(hub, size)
            home = Path(tmp) / size
            home.mkdir()
            cached = _plan(hub, home, ids, "task_arithmetic", "100TB")["disk"]
            runner = _plan(hub, home, ids, "task_arithmetic", "14GB")
            ties = _plan(hub, home, ids, "ties", "14GB")["disk"]
            disk = runner["disk"]
            streamed = sum(s["strategy"] == "streaming" for s in disk["sources"])
            upload = ", shards uploaded as written" if disk["upload_while_merging"] else ""
            rows.append(
                f"| {size} | {_gb(runner['downloads'][0]['bytes'])} GB "
                f"| {_gb(cached['peak_disk_bytes'])} / {_gb(cached['peak_memory_bytes'])} / "
                f"{_gb(cached['network_bytes'])} GB "
                f"| {streamed} of 4{upload} "
                f"| {_gb(disk['peak_disk_bytes'])} / {_gb(disk['peak_memory_bytes'])} GB "
                f"| {_gb(disk['network_bytes'])} / {_gb(ties['network_bytes'])} GB |"
            )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
