"""The output folder: replace only what hubmerge provably made, and never lose the only copy.

A run writes into a unique staging folder next to the target (`.NAME.hubmerge-XXXXXXXX`) that holds a
marker file locked (`flock`) for the life of the run, flushes every file to disk, then swaps:

    NAME → .NAME.hubmerge-old-XXXXXXXX     (only when NAME is a previous hubmerge output)
    staging → NAME
    remove .NAME.hubmerge-old-XXXXXXXX

A crash on any line leaves either the previous output or the new one at NAME, or (between the two renames)
the previous output in the `-old-` folder, which the next run moves back before doing anything else. A
staging folder is never taken for an output: the next run removes it once its marker is no longer locked,
that is once the process that made it has died.

A folder counts as a previous hubmerge output only when its `hubmerge.lock.json` parses, was written by
hubmerge, and lists exactly the files that are there, with their sizes (shards and GGUF files excepted, which may be
missing: a push that saves disk deletes each once uploaded). Anything else (a user's project,
a clone of a merged repo with files added, a file) is refused with a line naming what is in the way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import HubmergeError
from ..sources.budget import format_size
from .files import LOCK_FILE

__all__ = ["abandon", "check_target", "disk_full", "recover", "staged", "swap_in"]

MARKER = ".hubmerge-staging"  # inside a staging folder while its run is alive; the proof that it is ours
_OLD = "old-"  # after the staging prefix: .NAME.hubmerge-old-XXXXXXXX

# Staging folders of this process, so that a signal handler can remove them before exiting at once.
_running: dict[Path, IO[bytes]] = {}
_holding = False
_deferred: list[Callable[[], None]] = []


def _staging_prefix(directory: Path) -> str:
    return f".{directory.name}.hubmerge-"


def output_files(directory: Path) -> dict[str, int] | None:
    """The files and sizes the folder's lock says hubmerge wrote, or None when it is not a hubmerge output."""
    try:
        lock = json.loads((directory / LOCK_FILE).read_text(encoding="utf-8"))
        version = lock["hubmerge_version"]
        files = lock["output"]["files"]
        listed = {name: int(entry["size"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(version, str) or not all(
        isinstance(n, str) and n and not n.startswith("/") and ".." not in n.split("/") for n in listed
    ):
        return None
    return listed


def _unexpected(directory: Path, listed: dict[str, int]) -> list[str]:
    """What in `directory` the lock does not account for: files added, removed (shards excepted) or of another size."""
    # Links count as files (a linked folder would otherwise hide what is behind it), and so do empty
    # folders: hubmerge writes neither, so either is the user's.
    present = {
        p.relative_to(directory).as_posix(): p
        for p in directory.rglob("*")
        if p.is_symlink() or not p.is_dir() or not any(p.iterdir())
    }
    wrong = sorted(set(present) - set(listed) - {LOCK_FILE, MARKER})
    for name, size in listed.items():
        path = present.get(name)
        if path is None and name.endswith((".safetensors", ".gguf")):
            continue  # a shard or GGUF file pushed, then deleted to save disk: nothing of the user's to lose
        if path is None or not path.is_file() or path.is_symlink() or path.stat().st_size != size:
            wrong.append(name)
    return wrong


def check_target(directory: Path, output_bytes: int) -> None:
    """Refuse a target that is not ours to replace, or whose disk cannot hold `output_bytes` (the weights, or
    what the folder holds at once when shards are deleted as they are uploaded)."""
    target = directory.absolute()
    resolved = directory.resolve()
    cwd = Path.cwd().resolve()
    protected = {cwd, *cwd.parents, Path.home().resolve(), Path(resolved.anchor)}
    if resolved in protected:
        raise HubmergeError(
            f"{directory} is the current directory, one of its parents, or your home folder: hubmerge "
            "replaces its output folder as a whole; choose a new folder for [output] dir or --output"
        )
    if target.exists() and not target.is_dir():
        raise HubmergeError(
            f"{directory} is a file, not a folder; choose another [output] dir or --output, or remove it"
        )
    if target.is_dir() and any(target.iterdir()):
        listed = output_files(target)
        if listed is None:
            raise HubmergeError(
                f"{directory} exists and is not a hubmerge output (no valid {LOCK_FILE}); choose another "
                "[output] dir or --output, or remove it"
            )
        wrong = _unexpected(target, listed)
        if wrong:
            shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            raise HubmergeError(
                f"{directory} holds files its {LOCK_FILE} does not list as written by hubmerge ({shown}); "
                "move them elsewhere or choose another --output, since the folder is replaced as a whole"
            )
    existing = next((p for p in (target, *target.parents) if p.exists()), Path(target.anchor))
    free = shutil.disk_usage(existing).free
    if free < output_bytes:
        raise HubmergeError(
            f"{existing} has {format_size(free)} free but the merged weights need {format_size(output_bytes)} "
            "there; free some space or choose another --output"
        )


def _locked_by_a_live_run(marker: Path) -> bool:
    import fcntl

    try:
        with open(marker, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except FileNotFoundError:
        return False
    return False


def recover(directory: Path) -> None:
    """Undo what a run that died left next to `directory`: restore its previous output, drop its staging."""
    parent = directory.absolute().parent
    if not parent.is_dir():
        return
    prefix = _staging_prefix(directory)
    for leftover in sorted(parent.iterdir()):
        if not leftover.name.startswith(prefix) or leftover.is_symlink() or not leftover.is_dir():
            continue
        if leftover.name.startswith(prefix + _OLD):
            if not any(leftover.iterdir()):
                leftover.rmdir()  # died between making the name and moving the old output onto it
            elif output_files(leftover) is None:
                continue  # not provably ours: leave it alone
            elif not (directory.exists() or directory.is_symlink()):
                leftover.rename(directory)  # died between the two renames: put the previous output back
            else:
                shutil.rmtree(leftover)
        elif (leftover / MARKER).is_file() and not _locked_by_a_live_run(leftover / MARKER):
            shutil.rmtree(leftover)
        elif not any(leftover.iterdir()):
            # Died between making the folder and creating its marker. Nothing to lose; a live run that is
            # at that very step makes a new folder when its own vanishes (`staged`).
            with contextlib.suppress(OSError):
                leftover.rmdir()


def _mkdir_mode() -> int:
    """The mode `mkdir` gives a new folder: 0o777 less the umask (`mkdtemp` gives 0o700, owner only)."""
    try:  # Linux states the umask; reading it elsewhere means setting it, briefly, for the whole process
        status = Path("/proc/self/status").read_text()
        return 0o777 & ~int(re.search(r"^Umask:\s*([0-7]+)", status, flags=re.M).group(1), 8)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o777 & ~mask


@contextmanager
def staged(directory: Path) -> Iterator[Path]:
    """A fresh staging folder next to `directory`, removed unless `swap_in` consumed it."""
    import fcntl

    parent = directory.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    # A signal between creating the folder and registering it would leave it behind (`abandon` removes
    # only registered folders): the handler waits for both, as it waits for the renames of a swap.
    global _holding
    _holding = True
    try:
        for attempt in range(5):
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(directory), dir=parent))
            try:
                marker = open(staging / MARKER, "xb")  # noqa: SIM115 - held (and locked) until the run ends
                break
            except FileNotFoundError:  # another run's `recover` took the empty folder: make another
                if attempt == 4:
                    raise
        fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _running[staging] = marker
        staging.chmod(_mkdir_mode())  # the output folder follows the umask, as any folder the user makes
    finally:
        _holding = False
    if _deferred:
        abandon(_deferred.pop())
    try:
        yield staging
    finally:
        _running.pop(staging, None)
        marker.close()
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(staging: Path, directory: Path) -> None:
    """Flush `staging` to disk and move it into place, replacing the previous output (see module docstring)."""
    global _holding
    # A power cut after the rename must not leave a folder of empty files: data first, then the names.
    for path in staging.rglob("*"):
        _fsync(path)
    _fsync(staging)
    target = directory.absolute()
    parent = target.parent
    _holding = True  # a signal arriving now waits for the renames (see `abandon`)
    try:
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_staging_prefix(directory) + _OLD, dir=parent))
            target.rename(old)  # onto the empty folder just made: POSIX rename replaces an empty directory
        staging.rename(target)
        (target / MARKER).unlink()
        _fsync(parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        _holding = False
    if _deferred:
        abandon(_deferred.pop())


def abandon(finish: Callable[[], None]) -> None:
    """From a signal handler: remove this process's staging folders, then `finish` (which exits).

    While a staging folder is being made and registered, and during a swap, the handler waits for that to
    finish, so no folder is left unregistered and the target never stays empty.
    """
    if _holding:
        _deferred.append(finish)
        return
    for staging in list(_running):
        # The reader and writer threads keep running until the process exits and may add a file while
        # the tree is being removed; a second pass takes what the first one raced with.
        for _ in range(3):
            shutil.rmtree(staging, ignore_errors=True)
            if not staging.exists():
                break
    finish()


def disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space `OSError` behind `exc` (raised directly, or inside a writer thread), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        current = current.__cause__ or current.__context__
    return None
