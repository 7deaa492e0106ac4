"""Streamed sources are proven byte for byte against the Hub's sha256, whatever order the merge reads them in.

The sources here are written by `safetensors` as `save_pretrained` writes them: tensor names sorted as text,
so with 12 decoder layers `layers.10` and `layers.11` lie before `layers.2` while the merge reads them in
layer order. The local Hub then lies in its byte-range answers only (sizes, headers and the listed LFS sha256
stay right): the merge must refuse with one line naming the file, before any output is kept or pushed, for
each read pattern (one pass; TIES's passes; TIES settling its majority sign first when shards are deleted as
they are uploaded).
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.cli import invoke_cli
from support.hub import hub_env, local_hub
from support.hubserver import LocalHub

from hubmerge.errors import SourceError
from hubmerge.sources import remote

LAYERS = 12
VOCAB = 1024
REPOS = {"Qwen/deep12-base": 11, "Qwen/deep12-math": 12, "Qwen/deep12-coder": 13}
TAMPERED = "Qwen/deep12-math"
FILE = "model.safetensors"
# Sources of 0.64 MB; a bfloat16 output of 0.32 MB beside ~1.1 MB of side files (with the card's reserve)
# fits, no source does: every source streams. A float32 output (0.64 MB) does not fit: with a push, each shard
# is uploaded and deleted as it is written, and TIES settles its majority sign in a pass before the merge.
BUDGET = 1_500_000


def _data_start(content: bytes) -> int:
    return 8 + struct.unpack("<Q", bytes(content[:8]))[0]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    models = tmp_path_factory.mktemp("deep12")
    folders = {
        repo: write_checkpoint(
            models / repo.split("/")[1],
            random_state_dict(seed, vocab=VOCAB, layers=LAYERS),
            dtype=torch.float32,
            vocab_size=VOCAB,
            num_hidden_layers=LAYERS,
        )
        for repo, seed in REPOS.items()
    }
    with local_hub(folders) as server:
        server.create_repo("user/deep12-merged")  # where the "settle first" runs push
        yield server


def test_the_sources_store_tensors_out_of_the_merges_layer_order(hub: LocalHub) -> None:
    content = hub.files(TAMPERED)[FILE]
    header = json.loads(content[8 : _data_start(content)])
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    order = [name for _, name in by_offset]
    assert order.index("model.layers.10.mlp.down_proj.weight") < order.index(
        "model.layers.2.mlp.down_proj.weight"
    )


def _multiplied(content: bytes) -> bytes:
    """The same file with every weight tripled: same header, same size, other bytes."""
    tensors = safetensors.torch.load(bytes(content))
    lie = safetensors.torch.save({k: v * 3 for k, v in tensors.items()}, metadata={"format": "pt"})
    assert lie[: _data_start(lie)] == bytes(content[: _data_start(content)]) and len(lie) == len(content)
    return lie


def _tamper(hub: LocalHub, kind: str) -> None:
    content = hub.files(TAMPERED)[FILE]
    start = _data_start(content)
    if kind == "multiplied":
        lie = _multiplied(content)
        hub.tamper(TAMPERED, FILE, lambda s, e, c: lie[s : e + 1])
    elif kind == "shifted":  # tensor data from 4 bytes further on: what a wrong offset looks like
        shifted = bytes(content[:start]) + bytes(content[start + 4 :]) + bytes(4)
        hub.tamper(TAMPERED, FILE, lambda s, e, c: shifted[s : e + 1])
    else:  # "changed": the file is another model's (same header) once the header has been read
        other = hub.files("Qwen/deep12-coder")[FILE]
        hub.tamper(TAMPERED, FILE, lambda s, e, c: (other if s >= start else c)[s : e + 1])


def _recipe(tmp_path: Path, pattern: str) -> Path:
    method = "simple_average" if pattern == "one pass" else "ties"
    base = "" if method == "simple_average" else 'base = "Qwen/deep12-base"\n'
    models = '["Qwen/deep12-math", "Qwen/deep12-coder"]'
    params = "[parameters]\nscaling_factor = 0.8\nthreshold = 30\n" if method == "ties" else ""
    push = '[output]\nrepo = "user/deep12-merged"\n' if pattern == "settle first" else ""
    dtype = "float32" if pattern == "settle first" else "bfloat16"
    recipe = tmp_path / f"{method}.toml"
    recipe.write_text(f'method = "{method}"\n{base}models = {models}\ndtype = "{dtype}"\n{params}{push}')
    return recipe


def _run(
    hub: LocalHub, tmp_path: Path, recipe: Path, pattern: str, out: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = hub_env(hub, tmp_path / f"{out}-cache")  # a fresh, empty cache: every source streams
    # No sanity check or diagnostics: they read what the merge wrote, not the sources, and cost seconds each.
    args: tuple[str, ...] = ("--max-disk", str(BUDGET), "-q", "--no-sanity", "--no-stats", *extra)
    if pattern != "settle first":
        args += ("--no-push",)
    return invoke_cli(recipe, "--output", tmp_path / out, *args, env=env)


@pytest.fixture
def untampered(hub: LocalHub) -> Iterator[Callable[[str], None]]:
    yield lambda kind: _tamper(hub, kind)
    hub._tampers.clear()


PATTERNS = ["one pass", "several passes", "settle first"]


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_clean_streamed_merge_proves_every_file_and_equals_the_cached_merge(
    hub: LocalHub, tmp_path: Path, pattern: str
) -> None:
    recipe = _recipe(tmp_path, pattern)
    cached = invoke_cli(
        recipe,
        "--output",
        tmp_path / "cached",
        "-q",
        "--no-push",
        "--no-sanity",
        "--no-stats",
        env=hub_env(hub, tmp_path / "big"),
    )
    assert cached.returncode == 0, cached.stderr
    plan = invoke_cli("plan", recipe, "--json", "--max-disk", str(BUDGET), env=hub_env(hub, tmp_path / "p"))
    assert plan.returncode == 0, plan.stderr
    costs = json.loads(plan.stdout)["disk"]
    assert [s["strategy"] for s in costs["sources"]] == ["streaming"] * (2 if pattern == "one pass" else 3)
    assert costs["settle_first"] is (pattern == "settle first")
    since = len(hub.requests)
    streamed = _run(hub, tmp_path, recipe, pattern, "streamed")
    assert streamed.returncode == 0, streamed.stderr
    # The plan counted the proof: one read more than the merge's passes. Header probes aside (ranges from
    # byte 0 or 8 shorter than the file: the planner's and every pass's; ~100 KB each, as on a real Hub).
    size = len(hub.files(TAMPERED)[FILE])
    weights = sum(
        r.body_bytes
        for r in hub.requests[since:]
        if r.method == "GET"
        and r.path.endswith(".safetensors")
        and "/resolve/" in r.path
        and not (r.range and r.range.split("=")[1].split("-")[0] in ("0", "8") and r.body_bytes < size)
    )
    sources = len(costs["sources"])
    assert costs["reads"] * sources * size < weights <= costs["network_bytes"]
    lock = json.loads((tmp_path / "streamed" / "hubmerge.lock.json").read_text())
    sources = {s["role"]: s for s in lock["sources"]}
    assert {role: s["verified"] for role, s in sources.items()} == dict.fromkeys(sources, "sha256")
    for s in sources.values():
        assert s["files"][FILE]["sha256"] == hashlib.sha256(hub.files(s["repo_id"])[FILE]).hexdigest()
    if pattern == "settle first":
        pushed = {n: d for n, d in hub.files("user/deep12-merged").items() if n.endswith(".safetensors")}
        merged = {k: v for d in pushed.values() for k, v in safetensors.torch.load(d).items()}
    else:
        merged = safetensors.torch.load((tmp_path / "streamed" / FILE).read_bytes())
    reference = safetensors.torch.load((tmp_path / "cached" / FILE).read_bytes())
    assert sorted(merged) == sorted(reference)
    assert all(torch.equal(merged[k].view(torch.uint8), reference[k].view(torch.uint8)) for k in reference)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", ["multiplied", "shifted", "changed"])
def test_tampered_range_bytes_are_refused_in_one_line_naming_the_file_and_nothing_is_kept(
    hub: LocalHub, tmp_path: Path, untampered: Callable[[str], None], kind: str, pattern: str
) -> None:
    recipe = _recipe(tmp_path, pattern)
    commits = len(hub.commits("user/deep12-merged")) if pattern == "settle first" else 0
    untampered(kind)
    result = _run(hub, tmp_path, recipe, pattern, "out")
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"hubmerge: error: models[0] ({TAMPERED}): {TAMPERED}@"), line
    assert f"/{FILE}: " in line and ("its sha256 is " in line or "differ between two reads" in line), line
    assert not (tmp_path / "out").exists()
    if pattern == "settle first":  # shards went up as they were written, but no commit was made
        assert len(hub.commits("user/deep12-merged")) == commits


@pytest.mark.slow
def test_without_verification_the_lock_records_the_hubs_sha256_as_unchecked(
    hub: LocalHub, tmp_path: Path, untampered: Callable[[str], None]
) -> None:
    recipe = _recipe(tmp_path, "one pass")
    recipe.write_text(recipe.read_text() + "[output]\nverify_streamed = false\n")
    plan = invoke_cli("plan", recipe, "--max-disk", str(BUDGET), env=hub_env(hub, tmp_path / "p"))
    assert plan.returncode == 0, plan.stderr
    assert "sha256 not checked (verify_streamed = false)" in plan.stdout
    untampered("multiplied")  # the choice is the user's: a lying Hub is then not caught
    result = _run(hub, tmp_path, recipe, "one pass", "out")
    assert result.returncode == 0, result.stderr
    lock = json.loads((tmp_path / "out" / "hubmerge.lock.json").read_text())
    for source in lock["sources"]:
        assert source["verified"] == "size+header"
        assert "sha256" not in source["files"][FILE] and len(source["files"][FILE]["hub_sha256"]) == 64


# --- the proof itself, in process: any read order, any overlap -----------------------------------------------


class _Bytes:
    """A `RangeSource` over bytes in memory that counts what it serves."""

    def __init__(self, data: bytes) -> None:
        self.data, self.name, self.size, self.served = data, "mem", len(data), 0

    def readinto(self, offset: int, view: memoryview) -> None:
        view[:] = self.data[offset : offset + len(view)]
        self.served += len(view)

    def prefetch(self, offset: int, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _check(data: bytes) -> remote._FileCheck:
    folder = SimpleNamespace(
        repo_id="Qwen/x", sha="0" * 40, source=SimpleNamespace(label="models[0] (Qwen/x)")
    )
    return remote._FileCheck(folder, FILE, hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]


def _read(check: remote._FileCheck, data: bytes, offset: int, n: int) -> None:
    check.record(offset, memoryview(data[offset : offset + n]))


DATA = bytes(random.Random(0).randbytes(10_000))
CHUNKS = [(i, 1000) for i in range(0, 10_000, 1000)]


@pytest.mark.parametrize(
    ("order", "reread"),
    [
        (CHUNKS, 0),  # in file order: nothing read again
        (CHUNKS[:3] + CHUNKS[5:] + CHUNKS[3:5], 5000),  # a gap filled late: what follows it is read again
        (CHUNKS[::-1], 9000),  # only the first chunk arrived at the stream's end
        # samples first (TIES), inside later reads: checked as the stream passes them
        ([(2500, 10), (7100, 300), *CHUNKS[:4], *CHUNKS[6:], *CHUNKS[4:6]], 4000),
        # a sample behind the stream, another range than the one that fed it: stream again from byte 0
        ([*CHUNKS[:4], (1500, 20), *CHUNKS[4:]], 10_000),
        # the same ranges read again in a later pass, out of order
        (CHUNKS + CHUNKS[::-1], 0),
    ],
)
def test_reads_in_any_order_are_proven_by_reading_again_only_what_did_not_arrive_in_order(
    order: list[tuple[int, int]], reread: int
) -> None:
    check = _check(DATA)
    for offset, n in order:
        _read(check, DATA, offset, n)
    source = _Bytes(DATA)
    assert check.finish(source) == reread == source.served


def test_a_read_whose_bytes_are_not_the_files_is_refused_naming_it() -> None:
    lie = bytearray(DATA)
    lie[7200] ^= 1
    check = _check(DATA)
    for offset, n in CHUNKS[:3] + CHUNKS[5:] + CHUNKS[3:5]:  # chunk 7 was read (wrongly) out of order
        _read(check, bytes(lie), offset, n)
    with pytest.raises(SourceError, match=r"Qwen/x@000000000000/model\.safetensors: bytes 7000-7999 differ"):
        check.finish(_Bytes(DATA))


def test_a_lie_read_in_file_order_fails_the_files_sha256() -> None:
    lie = bytes(DATA[:-1]) + b"\0"
    check = _check(DATA)
    for offset, n in CHUNKS:
        _read(check, lie, offset, n)
    with pytest.raises(SourceError, match=r"its sha256 is .* but the Hub lists"):
        check.finish(_Bytes(lie))


def test_two_reads_of_one_range_that_differ_are_refused_at_once() -> None:
    check = _check(DATA)
    _read(check, DATA, 5000, 100)
    with pytest.raises(SourceError, match="bytes 5000-5099 differ between two reads"):
        _read(check, bytes(10_000), 5000, 100)
