"""The disk budget: how a merge fits the disk it may use, decided before the first download.

Each Hub source is read one of two ways:

* *cached*: its files are downloaded whole into the Hugging Face cache and read from there (today's path;
  the only one offline, and always the one for files already in the cache: those are never fetched again);
* *streaming*: its weights are never written to disk; the engine reads each slice by HTTP range through
  `huggingface_hub`'s `HfFileSystem` (remote.py), so a method that reads the inputs several times (a
  model-wide magnitude cut-off) fetches them several times.

Local folders are read in place. The output folder holds the whole output unless it is pushed and cannot
fit: then each shard is uploaded as soon as it is written and deleted (`upload_while_merging`), and the
folder holds about two shards at a time. A method that would rewrite closed shards after the last one
(`methods.Deferred`) then settles them with its `Deferral.settle` pass in one more read before the merge
(`settle_first`), so that no deleted shard is ever needed again. Sources are cached while the budget
allows (fastest, one fetch), streamed otherwise; when even streaming everything cannot fit, `plan_disk`
refuses with the numbers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import HubmergeError

__all__ = [
    "Budget",
    "DiskPlan",
    "SourceCost",
    "SourceNeeds",
    "default_budget",
    "format_size",
    "plan_disk",
]

Strategy = Literal["local", "cached", "streaming"]

# Kept free below the free space measured, for the cache's metadata, logs and other processes.
_MARGIN_FRACTION = 0.05
_MARGIN_MAX = 2**30


@dataclass(frozen=True)
class Budget:
    bytes: int  # for everything the run writes, or only the HF cache when `output` is set
    origin: str  # for messages: where the numbers come from
    output: int | None = None  # the output folder's own room, when it is on another filesystem


def default_budget(cache: Path, output: Path) -> Budget:
    """The free space of the HF cache's filesystem and of the output folder's (each on its own when they
    differ), minus a margin of `_MARGIN_FRACTION` (at most `_MARGIN_MAX`)."""

    def room(path: Path) -> tuple[Path, int, int, int]:
        existing = next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor))
        free = shutil.disk_usage(existing).free
        margin = min(_MARGIN_MAX, int(free * _MARGIN_FRACTION))
        return existing, max(0, free - margin), margin, os.stat(existing).st_dev

    cache_at, cache_room, margin, cache_device = room(cache)
    output_at, output_room, output_margin, output_device = room(output)
    if cache_device == output_device:
        return Budget(cache_room, f"free space on {cache_at} minus {format_size(margin)}")
    return Budget(
        cache_room,
        f"free space on {cache_at} (HF cache) minus {format_size(margin)}, and on {output_at} (output) minus "
        f"{format_size(output_margin)}",
        output=output_room,
    )


@dataclass(frozen=True)
class SourceNeeds:
    """What one source (each counted once) brings to the run, in bytes."""

    role: str  # its first mention, e.g. "models[0]"
    local: bool
    weight_bytes: int  # the weight files (and index) it is merged from
    weight_cached: int  # of which already in the local cache
    other_bytes: int  # config, card, license, tokenizer files: always downloaded whole
    other_cached: int


@dataclass(frozen=True)
class SourceCost:
    role: str
    strategy: Strategy
    disk_bytes: int  # new bytes written to the cache for it
    network_bytes: int  # bytes fetched for it over the whole run
    reason: str


@dataclass(frozen=True)
class DiskPlan:
    """How the run fits its disk budget, and what it costs; every number is in bytes."""

    budget: int  # for everything, or for the HF cache when `output_budget` is set
    budget_origin: str
    output_budget: int | None  # the output folder's own, when it is on another filesystem than the cache
    sources: tuple[SourceCost, ...]
    reads: int  # passes of the engine over every input
    output_bytes: int  # the merged weights
    output_disk: int  # what the output folder holds at most at once
    scratch_bytes: int  # the engine's scratch file (the positions a method leaves open), an estimate
    max_shard_size: int  # as chosen (the recipe's, or one that fits the budget)
    upload_while_merging: bool  # each shard is uploaded once written and deleted when the budget needs it
    # The method's `settle` pass runs before the merge (one read more) instead of patching closed shards.
    settle_first: bool
    peak_disk: int
    peak_memory: int
    network_bytes: int

    @property
    def strategy(self) -> Strategy:
        """`streaming` when any source streams, else `cached` when any is a Hub source, else `local`."""
        kinds = {s.strategy for s in self.sources}
        return "streaming" if "streaming" in kinds else "cached" if "cached" in kinds else "local"

    @property
    def streamed(self) -> frozenset[str]:
        """The roles of the sources read by range from the Hub."""
        return frozenset(s.role for s in self.sources if s.strategy == "streaming")


def format_size(n: int) -> str:
    """Bytes for people: GB, MB or B."""
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB" if n >= 10**5 else f"{n} B"


def plan_disk(
    needs: Sequence[SourceNeeds],
    *,
    budget: Budget,
    output_bytes: int,
    side_bytes: int,
    largest_tensor: int,
    max_shard_size: int,
    shard_size_set: bool,
    push: bool,
    offline: bool,
    reads: int,
    memory: int,
    slice_bytes: int,
    scratch_bytes: int,
    settle: bool = False,
    delete_uploaded: bool = False,
    verify: bool = True,
) -> DiskPlan:
    """Choose per source between cached and streaming, and the output's shard size, within `budget`.

    `output_bytes` counts the merged weights, `side_bytes` what is written beside them (tokenizer, card, lock).

    `memory` is the engine's peak without streaming; `slice_bytes` what one input slice weighs as stored
    (a streamed source holds one being read and one prefetched). `settle`: the method has a `settle` pass,
    run (one read more, no scratch file) when shards are deleted once uploaded; `delete_uploaded` asks for
    that deletion whether or not the output would fit (with a push). `verify`: a streamed file is read up to
    once more, in file order, to prove its sha256 (remote.py), and the network counts it. Raises `HubmergeError` with the numbers
    when even streaming every source leaves the budget too small.
    """
    # Every Hub source's small files go to the cache; the scratch file and the output to the output folder.
    metadata = sum(n.other_bytes - n.other_cached for n in needs if not n.local)
    separate = budget.output is not None
    output_room = budget.output if budget.output is not None else budget.bytes - metadata
    limit = format_size(budget.output if budget.output is not None else budget.bytes)
    shard = max_shard_size
    output_disk = output_bytes + side_bytes
    upload = push and (delete_uploaded or output_disk > output_room - scratch_bytes)
    settle_first = upload and settle
    if settle_first:  # no scratch file: nothing is patched afterwards
        reads += 1
        scratch_bytes = 0
    output_room -= scratch_bytes
    if upload or output_disk > output_room:
        if not push:
            raise HubmergeError(
                f"the merged output needs {format_size(output_disk)} in its folder, plus "
                f"{format_size(scratch_bytes + (0 if separate else metadata))} of "
                f"source metadata and scratch, but the disk budget is {limit} ({budget.origin}); raise --max-disk "
                "([output] max_disk), free some space, or set [output] repo and push, so that each shard is "
                "uploaded as it is written"
            )
        upload = True
        if not shard_size_set:  # two shards in the folder: one being written, one being uploaded
            shard = min(max_shard_size, max(largest_tensor, (output_room - side_bytes) // 2))
        output_disk = 2 * max(shard, largest_tensor) + side_bytes
        if output_disk > output_room:
            hint = (
                f"lower [output] max_shard_size (now {format_size(max_shard_size)}; at least "
                f"{format_size(largest_tensor)}, the largest tensor), "
                if shard_size_set and max_shard_size > largest_tensor
                else ""
            )
            other = (
                output_disk - 2 * max(shard, largest_tensor) + scratch_bytes + (0 if separate else metadata)
            )
            raise HubmergeError(
                "even streaming every source and uploading each shard as it is written, the merge needs "
                f"{format_size(output_disk + scratch_bytes + (0 if separate else metadata))} of disk (two output "
                f"shards of {format_size(max(shard, largest_tensor))}, {format_size(other)} of side files, source "
                f"metadata and scratch) but the budget is {limit} ({budget.origin}); {hint}raise --max-disk "
                "([output] max_disk) or free some space"
            )
    room = budget.bytes - metadata if separate else output_room - output_disk
    costs = []
    peak_memory = memory
    for n in needs:
        missing = n.weight_bytes - n.weight_cached
        other = n.other_bytes - n.other_cached
        if n.local:
            costs.append(SourceCost(n.role, "local", 0, 0, "a local folder, read in place"))
        elif not missing or offline:
            reason = (
                "offline: read from the cache"
                if offline and missing
                else "already in the cache"
                if n.weight_bytes
                else "no weights read"
            )
            costs.append(SourceCost(n.role, "cached", 0, other, reason))
        elif missing <= room:
            room -= missing
            costs.append(SourceCost(n.role, "cached", missing, missing + other, "fits the budget"))
        else:
            peak_memory += 2 * slice_bytes
            reason = f"{format_size(missing)} does not fit the {format_size(max(room, 0))} left"
            if reads > 1:
                reason += f"; read {reads} times"
            reason += (
                "; up to once more in file order to prove its sha256"
                if verify
                else "; sha256 not checked (verify_streamed = false)"
            )
            costs.append(SourceCost(n.role, "streaming", 0, missing * (reads + verify) + other, reason))
    peak_disk = metadata + scratch_bytes + output_disk + sum(c.disk_bytes for c in costs)
    return DiskPlan(
        budget=budget.bytes,
        output_budget=budget.output,
        budget_origin=budget.origin,
        sources=tuple(costs),
        reads=reads,
        output_bytes=output_bytes,
        output_disk=output_disk,
        scratch_bytes=scratch_bytes,
        max_shard_size=shard,
        upload_while_merging=upload,
        settle_first=settle_first,
        peak_disk=peak_disk,
        peak_memory=peak_memory,
        network_bytes=sum(c.network_bytes for c in costs),
    )
