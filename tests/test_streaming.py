"""The disk budget (budget.py) and streamed sources (remote.py), end to end against the local test Hub.

Sources are sharded as real Qwen2.5 repos are (shards + model.safetensors.index.json), stored in float32 so
that one source is larger than the budget while the bfloat16 output fits it. A streamed merge must equal the
cached one byte for byte, and must run inside a tmpfs the size of the budget holding the HF cache and the
output: the kernel, not an estimate, enforces the peak disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.cli import invoke_cli
from support.disk import mounted_tmpfs
from support.hub import folder_files, hub_env, local_hub
from support.hubserver import LocalHub, SparseFile
from support.qwen_shapes import add_shaped_repos, recipe_text

VOCAB = 32768  # float32: an embedding of 4 MiB, so a source is ~4.4 MB and the bf16 output ~2.2 MB
SHARDS = 3
REPOS = {"Qwen/tiny-base": 1, "Qwen/tiny-math": 2, "Qwen/tiny-coder": 3, "Qwen/tiny-chat": 4}
BUDGET = 4_000_000


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    models = tmp_path_factory.mktemp("models")
    folders = {
        repo: write_checkpoint(
            models / repo.split("/")[1],
            random_state_dict(seed, vocab=VOCAB),
            dtype=torch.float32,
            shards=SHARDS,
            vocab_size=VOCAB,
        )
        for repo, seed in REPOS.items()
    }
    with local_hub(folders) as server:
        yield server


def _recipe(tmp_path: Path, method: str, extra: str = "") -> Path:
    params = {
        "simple_average": "",
        "task_arithmetic": "[parameters]\nscaling_factor = 0.7\n",
        "ties": "[parameters]\nscaling_factor = 0.8\nthreshold = 30\n",
        # mergekit's methods with statistics passes: L1 norms and a seeded mask, Gram matrices, a band cut.
        "dare_ties": "[parameters]\ndensity = 0.5\nseed = 7\n",
        "model_stock": "",
        "breadcrumbs_ties": "[parameters]\ndensity = 0.6\ngamma = 0.05\n",
    }[method]
    base = "" if method == "simple_average" else 'base = "Qwen/tiny-base"\n'
    recipe = tmp_path / f"{method}.toml"
    recipe.write_text(
        f'method = "{method}"\n{base}models = ["Qwen/tiny-math", "Qwen/tiny-coder", "Qwen/tiny-chat"]\n'
        f'dtype = "bfloat16"\n{params}{extra}'
    )
    return recipe


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of exactly the budget: the HF cache and the output live there, so the disk really fills."""
    with mounted_tmpfs(tmp_path / "disk", BUDGET) as disk:
        yield disk


class _Watcher:
    """The most bytes used on a filesystem while a run lasts (a measure, for the report; the tmpfs's size is
    what enforces the budget)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, shutil.disk_usage(self.path).used)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, shutil.disk_usage(self.path).used)


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(".safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["simple_average", "task_arithmetic", "ties", "dare_ties", "model_stock", "breadcrumbs_ties"]
)
def test_streamed_merge_under_a_budget_smaller_than_one_source_equals_the_cached_merge(
    hub: LocalHub, tmp_path: Path, small_disk: Path, method: str
) -> None:
    recipe = _recipe(tmp_path, method)
    cached = invoke_cli(recipe, "--output", tmp_path / "cached", "-q", env=hub_env(hub, tmp_path / "big"))
    assert cached.returncode == 0, cached.stderr

    env = hub_env(hub, tmp_path, HF_HOME=str(small_disk / "hf_home"))
    plan = invoke_cli(
        "plan", recipe, "--json", "--max-disk", str(BUDGET), "--output", small_disk / "out", env=env
    )
    assert plan.returncode == 0, plan.stderr
    disk = json.loads(plan.stdout)["disk"]
    assert disk["strategy"] == "streaming"
    assert {s["strategy"] for s in disk["sources"]} == {"streaming"}
    assert disk["peak_disk_bytes"] <= BUDGET
    source_bytes = sum(len(d) for n, d in hub.files("Qwen/tiny-math").items() if n.endswith(".safetensors"))
    assert source_bytes > BUDGET  # one source alone would not fit
    # One read to merge, one per statistics pass, one more per selection for its sample (tiny: the whole model).
    reads = {"ties": 3, "dare_ties": 2, "model_stock": 2, "breadcrumbs_ties": 3}.get(method, 1)
    assert disk["reads"] == reads

    since = len(hub.requests)
    watcher = _Watcher(small_disk)
    streamed = invoke_cli(recipe, "--output", small_disk / "out", "-q", "--max-disk", str(BUDGET), env=env)
    peak = watcher.stop()
    assert streamed.returncode == 0, streamed.stderr
    assert peak <= BUDGET
    assert _weights(small_disk / "out") == _weights(tmp_path / "cached")
    # No weight file was downloaded whole: every weight byte came by range.
    whole = hub.bytes_served(lambda p: p.endswith(".safetensors"), include_ranges=False, since=since)
    assert whole == 0
    fetched = hub.bytes_served(lambda p: p.endswith(".safetensors"), since=since)
    inputs = 3 if method == "simple_average" else 4
    assert fetched >= reads * inputs * source_bytes  # as many full reads of every input as the plan said
    lock = json.loads((small_disk / "out" / "hubmerge.lock.json").read_text())
    assert {s["verified"] for s in lock["sources"]} <= {"sha256", "size+header"}
    cached_lock = json.loads((tmp_path / "cached" / "hubmerge.lock.json").read_text())
    assert [s["files"] for s in lock["sources"]] == [s["files"] for s in cached_lock["sources"]]
    assert {s["verified"] for s in cached_lock["sources"]} == {"sha256"}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_small_tensors_of_a_layer_are_fetched_in_one_request(
    hub: LocalHub, tmp_path: Path, method: str
) -> None:
    """A streamed read of a whole small tensor takes the small tensors after it in the file, of the same decoder
    layer, in the same request (`remote._HubFile`): one range request per layer and file, one per tensor
    outside the layers, instead of one per tensor. The merge equals the cached one (bytes, to the bit).
    TIES's selection samples a tensor that fits its sample whole, in one read, not in row blocks."""
    recipe = _recipe(tmp_path, method, "[output]\nverify_streamed = false\n")
    cached = invoke_cli(
        recipe, "--output", tmp_path / "cached", "-q", "--no-stats", env=hub_env(hub, tmp_path / "big")
    )
    assert cached.returncode == 0, cached.stderr
    since = len(hub.requests)
    args = ("--output", tmp_path / "streamed", "-q", "--no-stats", "--max-disk", str(BUDGET))
    streamed = invoke_cli(recipe, *args, env=hub_env(hub, tmp_path / "small"))
    assert streamed.returncode == 0, streamed.stderr
    assert _weights(tmp_path / "streamed") == _weights(tmp_path / "cached")

    # Where each file's decoder-layer tensors start: (file, absolute offset) -> layer (all small here).
    layer_at: dict[tuple[str, int], str] = {}
    spans = []  # (file, absolute start, end) of each decoder-layer tensor
    for name, content in hub.files("Qwen/tiny-math").items():
        if name.endswith(".safetensors"):
            data = 8 + int.from_bytes(content[:8], "little")
            header = json.loads(bytes(content[8:data]))
            for tensor, info in header.items():
                if tensor.startswith("model.layers."):
                    first, last = info["data_offsets"]
                    spans.append((name, data + first, data + last))
                    assert last - first <= 2**20
                    layer_at[(name, data + first)] = tensor.split(".")[2]
    reads = [
        (r.path.rsplit("/", 1)[1], int(r.range.split("=")[1].split("-")[0]))
        for r in hub.requests[since:]
        if r.method == "GET" and "/Qwen/tiny-math/" in r.path and r.path.endswith(".safetensors") and r.range
    ]
    layer_reads = [read for read in reads if read in layer_at]
    layers = {(f, layer_at[f, o]) for (f, o) in layer_at}
    if method == "ties":  # several passes (sample, cut-off, merge), each reading whole tensors only
        # Inside the decoder layers, whose tensors fit the selection's sample whole, no read starts mid-tensor.
        inside = [r for r in reads if any(f == r[0] and a < r[1] < b for f, a, b in spans)]
        assert inside == []
        assert len(layers) * 3 <= len(layer_reads) <= len(layer_at)
        return
    # One request per layer and file (a layer's 12 tensors, split between shards here), none twice.
    assert len(layer_reads) == len(set(layer_reads)) == len(layers)
    assert len(layer_reads) * 4 <= len(layer_at)


DEEP = {"Qwen/deep-base": 21, "Qwen/deep-math": 22, "Qwen/deep-coder": 23}
DEEP_BUDGET = 1_450_000  # a source and the float32 output are ~1.6 MB each: neither fits


@pytest.fixture
def smaller_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "smaller", DEEP_BUDGET) as disk:
        yield disk


@pytest.fixture(scope="module")
def deep_repos(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Base + 2 of many small layers, so that an output of ~1.6 MB splits into many small shards."""
    folder = tmp_path_factory.mktemp("deep")
    for repo, seed in DEEP.items():
        written = write_checkpoint(
            folder / repo.split("/")[1],
            random_state_dict(seed, vocab=1024, layers=40),
            dtype=torch.float32,
            shards=SHARDS,
            vocab_size=1024,
            num_hidden_layers=40,
        )
        hub.create_repo(repo)
        hub.commit(repo, folder_files(written), "Upload model")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_pushed_under_a_budget_smaller_than_the_output_each_shard_is_uploaded_and_deleted(
    hub: LocalHub, deep_repos: None, tmp_path: Path, smaller_disk: Path, method: str
) -> None:
    """Sources and output each larger than the disk: sources stream by range, each output shard is uploaded
    and deleted as the merge goes, and TIES settles its majority sign before the merge (one read more) so
    that no deleted shard is needed again. The pushed tensors equal the cached merge's, bit for bit."""
    ties = method == "ties"
    recipe = tmp_path / f"{method}.toml"
    recipe.write_text(
        f'method = "{method}"\nbase = "Qwen/deep-base"\nmodels = ["Qwen/deep-math", "Qwen/deep-coder"]\n'
        f'dtype = "float32"\n[parameters]\nscaling_factor = 0.8\n{"threshold = 30" if ties else ""}\n'
        f'[output]\nrepo = "user/deep-{method}"\n'
    )
    cached = invoke_cli(
        recipe, "--output", tmp_path / "cached", "-q", "--no-push", env=hub_env(hub, tmp_path / "big")
    )
    assert cached.returncode == 0, cached.stderr

    env = hub_env(hub, tmp_path, HF_HOME=str(smaller_disk / "hf_home"))
    args = ("--output", smaller_disk / "out", "--max-disk", str(DEEP_BUDGET))
    plan = invoke_cli("plan", recipe, "--json", *args, env=env)
    assert plan.returncode == 0, plan.stderr
    disk = json.loads(plan.stdout)["disk"]
    assert disk["output_disk_bytes"] < DEEP_BUDGET < json.loads(plan.stdout)["output"]["bytes"]
    assert (disk["strategy"], disk["upload_while_merging"], disk["settle_first"]) == ("streaming", True, ties)
    assert disk["reads"] == (4 if ties else 1) and disk["peak_disk_bytes"] <= DEEP_BUDGET
    text = invoke_cli("plan", recipe, *args, env=env).stdout
    said = "the majority pass settles first what would otherwise rewrite uploaded shards"
    assert (said in text) is ties

    since = len(hub.requests)
    watcher = _Watcher(smaller_disk)
    streamed = invoke_cli(recipe, *args, "-q", env=env)
    peak = watcher.stop()
    assert streamed.returncode == 0, streamed.stderr
    assert peak <= DEEP_BUDGET
    files = hub.files(f"user/deep-{method}")
    shards = [data for name, data in files.items() if name.endswith(".safetensors")]
    assert len(shards) >= 4  # the output was split into shards that fit (the cached run wrote one file)
    pushed = {k: v for data in shards for k, v in safetensors.torch.load(data).items()}
    reference = safetensors.torch.load(_weights(tmp_path / "cached")["model.safetensors"])
    assert sorted(pushed) == sorted(reference)
    assert all(torch.equal(pushed[k].view(torch.uint8), reference[k].view(torch.uint8)) for k in reference)
    assert _weights(smaller_disk / "out") == {}  # each shard was deleted once uploaded
    puts = [r for r in hub.requests[since:] if r.method == "PUT" and "/lfs-upload/" in r.path]
    assert len(puts) == len(shards)  # each shard once: none was rewritten after its upload


@pytest.mark.slow  # a real process on a pseudo-terminal
def test_the_progress_bar_shows_the_bytes_streamed_in_and_their_rate(hub: LocalHub, tmp_path: Path) -> None:
    """On a terminal, the merge's progress bar carries "in N MB at R MB/s" for the sources read by range."""
    recipe = _recipe(tmp_path, "task_arithmetic")
    main, terminal = pty.openpty()
    # A fresh pty is 0 columns wide, and tqdm draws a bar of its terminal's width: give it 200.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hubmerge.cli",
            recipe,
            "--output",
            tmp_path / "out",
            "--max-disk",
            str(BUDGET),
        ],
        env={**os.environ, **hub_env(hub, tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    shown = bytearray()
    while True:  # until the child's end of the terminal is closed
        try:
            block = os.read(main, 65536)
        except OSError:
            break
        if not block:
            break
        shown += block
    os.close(main)
    assert process.wait(timeout=300) == 0, shown.decode(errors="replace")
    bars = [
        line for line in re.split(r"[\r\n]", shown.decode(errors="replace")) if line.startswith("merging")
    ]
    assert bars, shown.decode(errors="replace")
    final = re.search(r"in ([\d,.]+) MB at [\d,.]+ MB/s", bars[-1])
    assert final is not None, bars[-1]
    # Every weight byte of the four sources came in by range (the plan's one read of each).
    sources = 4 * sum(len(d) for n, d in hub.files("Qwen/tiny-math").items() if n.endswith(".safetensors"))
    assert float(final.group(1).replace(",", "")) * 1e6 >= 0.9 * sources


# --- faults while streaming ------------------------------------------------------------------------------

DATA = 64  # a range starting here or later reads tensor data: headers and the plan's probes start at 0 or 8


def _stream(hub: LocalHub, tmp_path: Path, recipe: Path, out: str) -> subprocess.CompletedProcess[str]:
    env = hub_env(hub, tmp_path / f"{out}-cache")  # a fresh, empty cache
    return invoke_cli(recipe, "--output", tmp_path / out, "-q", "--max-disk", str(BUDGET), env=env)


@pytest.mark.slow
@pytest.mark.usefixtures("no_retry_waits")
def test_dropped_connections_and_5xx_bursts_mid_range_are_retried_and_the_merge_is_exact(
    hub: LocalHub, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, "task_arithmetic")
    cached = invoke_cli(recipe, "--output", tmp_path / "cached", "-q", env=hub_env(hub, tmp_path / "big"))
    assert cached.returncode == 0, cached.stderr

    since = len(hub.requests)
    hub.cut_next(2, "tiny-math/resolve/", method="GET", from_byte=DATA)
    hub.fail_next(2, 503, "tiny-coder/resolve/", method="GET", from_byte=DATA)
    hub.drop_next(1, "tiny-chat/resolve/", method="GET", from_byte=DATA)
    streamed = _stream(hub, tmp_path, recipe, "streamed")
    assert streamed.returncode == 0, streamed.stderr
    assert _weights(tmp_path / "streamed") == _weights(tmp_path / "cached")
    faults = [r for r in hub.requests[since:] if r.status in (0, 503)]
    assert len([r for r in faults if r.status == 503]) == 2
    assert len([r for r in faults if r.status == 0]) == 1
    assert not hub._faults  # every injected fault was met
    assert hub.server_errors == []


@pytest.mark.slow
@pytest.mark.usefixtures("no_retry_waits")
def test_a_hub_that_keeps_failing_mid_stream_ends_in_one_line_and_no_output(
    hub: LocalHub, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, "task_arithmetic")
    hub.fail_next(1000, 503, "tiny-math/resolve/", method="GET", from_byte=DATA)
    try:
        streamed = _stream(hub, tmp_path, recipe, "streamed")
    finally:
        hub._faults.clear()
    assert streamed.returncode == 3, streamed.stderr
    line = streamed.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "hubmerge: error: models[0] (Qwen/tiny-math): the Hub answered 503 for Qwen/tiny-math"
    )
    assert not (tmp_path / "streamed").exists()


@pytest.mark.slow  # a real process, held mid-read by the Hub
def test_a_slow_range_is_waited_for(hub: LocalHub, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "simple_average")
    held = hub.hold_next("tiny-chat/resolve/", method="GET", from_byte=DATA)
    env = {**os.environ, **hub_env(hub, tmp_path / "hf")}
    env.pop("HUBMERGE_DEBUG", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hubmerge.cli",
            recipe,
            "--output",
            tmp_path / "out",
            "-q",
            "--max-disk",
            str(BUDGET),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert held.arrived.wait(120)  # the run is provably waiting on a range of tensor data
        assert process.poll() is None
    finally:
        held.release.set()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert (tmp_path / "out" / "hubmerge.lock.json").is_file()


# --- plans of Qwen2.5-shaped repos (sparse shards: a plan reads only headers) ----------------------------

RUNNER_DISK = "14GB"  # what a GitHub-hosted runner has free


@pytest.fixture(scope="module")
def shaped_hub() -> Iterator[tuple[LocalHub, dict[str, list[str]]]]:
    with local_hub() as server:
        server.add_user("shaped", "hf_shaped_token")
        yield server, {size: add_shaped_repos(server, size) for size in ("7B", "14B", "72B")}


def _plan(
    shaped_hub: tuple[LocalHub, dict[str, list[str]]],
    tmp_path: Path,
    size: str,
    max_disk: str,
    method: str = "task_arithmetic",
    push: bool = True,
    extra: str = "",
) -> subprocess.CompletedProcess[str]:
    hub, ids = shaped_hub
    recipe = tmp_path / f"{size}.toml"
    recipe.write_text(recipe_text(ids[size], method, "user/merged" if push else None) + extra)
    return invoke_cli("plan", recipe, "--json", "--max-disk", max_disk, env=hub_env(hub, tmp_path))


@pytest.mark.parametrize(("size", "method"), [("7B", "task_arithmetic"), ("14B", "ties"), ("72B", "ties")])
def test_qwen25_shaped_base_plus_3_plans_a_streamed_merge_within_a_runners_14_gb(
    shaped_hub: tuple[LocalHub, dict[str, list[str]]], tmp_path: Path, size: str, method: str
) -> None:
    hub, _ = shaped_hub
    since = len(hub.requests)
    result = _plan(shaped_hub, tmp_path, size, RUNNER_DISK, method)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    disk = data["disk"]
    source_bytes = data["downloads"][0]["bytes"]
    assert source_bytes > 14e9  # one source alone is larger than the disk
    assert disk["strategy"] == "streaming"
    assert [s["strategy"] for s in disk["sources"]] == ["streaming"] * 4
    assert disk["upload_while_merging"] is True
    assert disk["peak_disk_bytes"] <= 14e9 == disk["budget_bytes"]
    assert disk["output_disk_bytes"] <= 2 * disk["max_shard_size"] + 2e6
    assert disk["peak_memory_bytes"] < 2e9  # memory does not grow with the model
    # TIES settles its majority sign in one more read, so that no uploaded (deleted) shard is rewritten.
    assert disk["settle_first"] is (method == "ties")
    reads = 4 if method == "ties" else 1
    assert disk["reads"] == reads
    assert disk["network_bytes"] >= 4 * reads * (source_bytes - 1e6)
    # Planning read headers only: a few hundred kB per shard at most.
    served = hub.bytes_served(lambda p: p.endswith(".safetensors"), since=since)
    shards = sum(1 for f in data["downloads"][0]["files"] if f.endswith(".safetensors"))
    assert served <= 4 * shards * 100_001


@pytest.mark.parametrize("size", ["7B", "72B"])
def test_a_budget_too_small_even_for_streaming_is_refused_with_the_numbers(
    shaped_hub: tuple[LocalHub, dict[str, list[str]]], tmp_path: Path, size: str
) -> None:
    result = _plan(shaped_hub, tmp_path, size, "2GB")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "hubmerge: error: even streaming every source and uploading each shard as it is written"
    )
    assert "but the budget is 2.00 GB" in line
    assert line.endswith("raise --max-disk ([output] max_disk) or free some space")


def test_without_a_push_the_output_folder_must_fit_the_budget(
    shaped_hub: tuple[LocalHub, dict[str, list[str]]], tmp_path: Path
) -> None:
    result = _plan(shaped_hub, tmp_path, "7B", RUNNER_DISK, push=False)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hubmerge: error: the merged output needs 15.2")
    assert "the disk budget is 14.00 GB" in line
    assert "set [output] repo and push" in line


def test_the_shard_size_is_chosen_to_fit_unless_the_recipe_sets_one_that_cannot(
    shaped_hub: tuple[LocalHub, dict[str, list[str]]], tmp_path: Path
) -> None:
    chosen = _plan(shaped_hub, tmp_path, "14B", "8GB")
    assert chosen.returncode == 0, chosen.stderr
    data = json.loads(chosen.stdout)
    assert data["disk"]["max_shard_size"] < 4e9
    assert data["disk"]["peak_disk_bytes"] <= 8e9
    assert len(data["output"]["shards"]) > 29.5 // 5  # smaller shards than 5 GB, so more of them

    fixed = _plan(shaped_hub, tmp_path, "14B", "8GB", extra='max_shard_size = "5GB"\n')
    assert fixed.returncode == 1
    line = fixed.stderr.strip().splitlines()[-1]
    assert "lower [output] max_shard_size (now 5.00 GB; at least 1.56 GB, the largest tensor)" in line


# --- integrity -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_streamed_files_read_whole_in_order_are_checked_against_their_lfs_sha256(
    hub: LocalHub, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, "task_arithmetic")
    result = _stream(hub, tmp_path, recipe, "streamed")
    assert result.returncode == 0, result.stderr
    lock = json.loads((tmp_path / "streamed" / "hubmerge.lock.json").read_text())
    # The tiny shards store their tensors in the order the merge reads them: every byte passed through.
    assert {s["role"]: s["verified"] for s in lock["sources"]} == dict.fromkeys(
        ["base", "models[0]", "models[1]", "models[2]"], "sha256"
    )


def test_a_streamed_file_whose_bytes_differ_from_the_hubs_sha256_is_an_error_naming_it(
    hub: LocalHub, tmp_path: Path
) -> None:
    # A file whose listed sha256 is not that of its bytes (what a corrupted transfer looks like).
    content = hub.files("Qwen/tiny-chat")
    forged = {
        n: SparseFile(bytes(d), len(d)) if n.endswith(".safetensors") else d for n, d in content.items()
    }
    hub.create_repo("Qwen/tiny-forged")
    hub.commit("Qwen/tiny-forged", forged, "Upload model")
    recipe = tmp_path / "forged.toml"
    recipe.write_text(
        'method = "task_arithmetic"\nbase = "Qwen/tiny-base"\nmodels = ["Qwen/tiny-forged"]\n'
        'dtype = "bfloat16"\n[parameters]\nscaling_factor = 0.5\n'
    )
    result = _stream(hub, tmp_path, recipe, "streamed")
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hubmerge: error: models[0] (Qwen/tiny-forged): Qwen/tiny-forged@")
    assert ".safetensors: its sha256 is " in line and "but the Hub lists" in line
    assert not (tmp_path / "streamed").exists()


def test_a_damaged_file_in_the_cache_is_an_error_naming_it(hub: LocalHub, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "simple_average")
    env = hub_env(hub, tmp_path / "cache")
    assert invoke_cli(recipe, "--output", tmp_path / "first", "-q", env=env).returncode == 0
    blob = next(
        (tmp_path / "cache" / "hf_home" / "hub" / "models--Qwen--tiny-coder" / "blobs").glob("?" * 64)
    )
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one bit of the last tensor: same size, same header
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    result = invoke_cli(recipe, "--output", tmp_path / "second", "-q", env=env)
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hubmerge: error: models[1] (Qwen/tiny-coder): ")
    assert "the cached copy is damaged: delete it (`hf cache rm`) and run again" in line
    assert not (tmp_path / "second").exists()


def test_a_disk_budget_that_is_not_a_size_is_a_one_line_error(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'method = "simple_average"\nmodels = ["Qwen/a", "Qwen/b"]\n[output]\nmax_disk = "lots"\n'
    )
    result = invoke_cli("validate", recipe)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f'hubmerge: error: {recipe}: output.max_disk: must be a size such as "5GB", "500MB" or a number of '
        "bytes, got 'lots'"
    )
    flag = invoke_cli("plan", recipe, "--max-disk", "lots")
    assert flag.returncode == 2
    assert "argument --max-disk: must be a size such as" in flag.stderr
