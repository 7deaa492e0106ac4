"""Model references as a recipe and a mergekit config write them: a local folder, or a Hub id with an optional
revision (`org/name@revision`). One parser for both (`recipe/load.py`, `interop/mergekit.py`); each says in
its own words what the reference is for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..merging.schedule import Setting
from .schema import is_repo_id, resolve_path

__all__ = ["BadReference", "ModelRef", "parse_reference"]

_PATH_PREFIXES = (".", "/", "~")  # a reference written as a path is a local folder, even a missing one


@dataclass(frozen=True)
class ModelRef:
    """A source model as the recipe names it: a local folder, or a Hub repo at a revision."""

    text: str  # as written, for messages and the card
    path: Path | None = None  # absolute, for local folders
    repo_id: str | None = None
    revision: str | None = None  # as written; resolved to a commit sha by the source stage
    params: Mapping[str, Setting] = field(default_factory=dict)  # this mention's own per-model settings
    # For a Hub id that is also a path under an existing folder next to the recipe (`tiny/mathh`): the
    # folder it would be, so that a failed Hub lookup can say "no such folder" instead of "cannot reach".
    near: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def display(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return str(self.path)


class BadReference(ValueError):
    """A reference that names neither a folder nor a Hub repo, or pins a revision it cannot have."""


def parse_reference(text: str, roots: Sequence[Path], revision: str | None = None) -> ModelRef:
    """`text` (stripped) as a local folder or a Hub id (`id@revision`, or `revision` given apart).

    A folder is a reference written as a path (./, ../, /, ~), relative to `roots[0]`, or one that exists
    under a root (the first that has it); anything else is a Hub id. Raises `BadReference`."""
    text = text.strip()
    if not text:
        raise BadReference('is empty; give a Hub id such as "Qwen/Qwen2.5-1.5B" or a folder path')
    try:
        candidates = [resolve_path(text, root) for root in roots]
    except ValueError as exc:
        raise BadReference(str(exc)) from None
    folder = next((p for p in candidates if p.is_dir()), None)
    if folder is None and text.startswith(_PATH_PREFIXES):
        folder = candidates[0]
    if folder is not None:
        if revision is not None:
            raise BadReference(f"{text!r} is a local folder; a revision applies to Hub models only")
        return ModelRef(text, path=folder)
    repo_id, _, at_revision = text.partition("@")
    if at_revision and revision is not None:
        raise BadReference(f"{text!r} already pins a revision; drop either '@{at_revision}' or 'revision'")
    if not is_repo_id(repo_id):
        raise BadReference(
            f"{text!r} is neither an existing folder (relative to {roots[0]}) nor a Hub id like "
            '"org/name[@revision]"'
        )
    return ModelRef(text, repo_id=repo_id, revision=at_revision or revision)
