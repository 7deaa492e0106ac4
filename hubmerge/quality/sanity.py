"""The quick sanity check after every merge: is the output finite, does it still model text?

It needs no extra (torch, and transformers for the tokenizer only) and holds a few hundred MB at any size:

1. every tensor of the merged model is finite;
2. its mean loss (nats per token) on a few short texts per domain (math, code, chat; `data/sanity_texts.json`,
   written for hubmerge) is compared with each source's loss on the same texts, with the output's tokenizer.

The losses come from `forward.token_losses`, a Qwen2 forward pass run layer by layer from the safetensors
files (equal to transformers' float32 forward pass to float rounding), all texts of a model in one pass.
A source's losses are remembered (`_LossCache`, under `$HUBMERGE_CACHE`) by what its weights are, the token
ids, the device and the versions that computed them: merging the same sources again runs one forward pass,
the merge's, instead of one per model.

A merge fails the check when, in some domain, its loss is above `LOSS_RATIO` (1.5) times the worst source's
loss there, or not finite: a merge that broke the model (a scaling factor of 50, a wrong weight, a dtype
overflow) lands far above that, while a working merge lands between its sources or close to them. A failed
check is a loud warning in the terminal and in the card, not an error: the user decides.

What cannot be measured is skipped with a one-line reason, never an error: no tokenizer in the output,
texts that tokenize to fewer than two tokens, a config the forward pass does not implement.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .forward import Checkpoint

__all__ = ["LOSS_RATIO", "SanityReport", "check", "sanity_texts"]

LOSS_RATIO = 1.5
TEXTS = Path(__file__).parents[1] / "data" / "sanity_texts.json"


@dataclass(frozen=True)
class SanityReport:
    """What the check found. `losses` maps "merged" and each source's label to {domain: nats per token}."""

    losses: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    skipped: str | None = None  # why the check did not run

    @property
    def passed(self) -> bool:
        return self.skipped is None and not self.warnings

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "loss_ratio": LOSS_RATIO,
            "losses": {name: dict(domains) for name, domains in self.losses.items()},
            "warnings": list(self.warnings),
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SanityReport:
        """The report `to_json` wrote (eval_results.json)."""
        return cls(data["losses"], tuple(data["warnings"]), data["skipped"])

    def summary(self) -> str:
        """One line for the terminal."""
        if self.skipped is not None:
            return f"sanity check skipped: {self.skipped}"
        merged = self.losses.get("merged", {})
        losses = ", ".join(f"{domain} {loss:.3g}" for domain, loss in merged.items())
        return f"sanity check {'passed' if self.passed else 'FAILED'}: merged loss per token {losses}"


def sanity_texts() -> dict[str, list[str]]:
    """The shipped texts, by domain."""
    data: dict[str, list[str]] = json.loads(TEXTS.read_text(encoding="utf-8"))
    return data


def _tokenize(folder: Path, texts: Mapping[str, Sequence[str]]) -> dict[str, list[list[int]]] | str:
    """Each domain's texts as token ids with the tokenizer in `folder`, leaving out texts of fewer than two
    tokens (nothing to predict); or why that cannot be done."""
    from ..sources.resolve import TOKENIZER_FILES

    if not any((folder / name).is_file() for name in TOKENIZER_FILES if name != "chat_template.jinja"):
        return (
            "the merged folder has no tokenizer files (its tokenizer source ships none); set [tokenizer] source "
            "in the recipe to a model that has them"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        ids = {domain: [list(tokenizer(text).input_ids) for text in items] for domain, items in texts.items()}
    except Exception as exc:  # no usable tokenizer in the output: nothing to measure the loss with
        return f"the output's tokenizer does not load ({type(exc).__name__}: {exc})"
    kept = {domain: [s for s in sequences if len(s) >= 2] for domain, sequences in ids.items()}
    empty = [domain for domain, sequences in kept.items() if not sequences]
    if empty:
        return f"the output's tokenizer encodes every {empty[0]} text to fewer than two tokens: no token to predict"
    return kept


def _domain_losses(
    checkpoint: Checkpoint,
    ids: Mapping[str, list[list[int]]],
    device: torch.device,
    check_finite: bool = False,
) -> tuple[dict[str, float], tuple[str, ...]]:
    """The mean loss per predicted token of each domain, all texts in one pass; and the non-finite tensors."""
    import torch

    from .forward import token_losses

    sequences = [s for domain in ids.values() for s in domain]
    result = token_losses(checkpoint, sequences, device, check_finite)
    losses, first = {}, 0
    for domain, items in ids.items():
        per_token = torch.cat(result.per_sequence[first : first + len(items)]).double()
        losses[domain] = float(per_token.mean())
        first += len(items)
    return losses, result.nonfinite


def check(output: Path, sources: Sequence[Checkpoint], device: torch.device | None = None) -> SanityReport:
    """Check the merged model in `output` against `sources` (in recipe order, labelled as the recipe names
    them), computing on `device` (the CPU by default). Never raises: what it cannot measure, it skips with
    the reason."""
    import torch

    from ..errors import HubmergeError

    try:
        return _check(output, sources, device or torch.device("cpu"))
    except HubmergeError as exc:  # e.g. a streamed source the Hub no longer serves: its own one-line reason
        return SanityReport(skipped=str(exc))
    except Exception as exc:  # an optional check never turns a good merge into a failure
        return SanityReport(
            skipped=f"the check stopped on an unexpected error ({type(exc).__name__}: {exc}); please report it"
        )


def _check(output: Path, sources: Sequence[Checkpoint], device: torch.device) -> SanityReport:
    from .forward import Checkpoint, Unrunnable

    ids = _tokenize(output, sanity_texts())
    if isinstance(ids, str):
        return SanityReport(skipped=ids)
    merged = Checkpoint.local("the merged model", output)
    try:
        merged_losses, nonfinite = _domain_losses(merged, ids, device, check_finite=True)
    except Unrunnable as exc:
        return SanityReport(skipped=str(exc))
    warnings = [f"tensor {name} of the merged model has non-finite values (inf or NaN)" for name in nonfinite]
    losses = {"merged": merged_losses}
    cache = _LossCache.open()
    for source in sources:
        key = cache.key(source, ids, device)
        known = cache.get(key)
        if known is not None:
            losses[source.label] = known
            continue
        try:
            losses[source.label] = _domain_losses(source, ids, device)[0]
        except Unrunnable as exc:  # nothing to compare with
            return SanityReport(losses, tuple(warnings), f"source {source.label}: {exc}")
        cache.put(key, losses[source.label])
    for domain, loss in losses["merged"].items():
        worst = max((losses[source.label][domain] for source in sources), default=math.inf)
        if not math.isfinite(loss) or loss > LOSS_RATIO * worst:
            warnings.append(
                f"the merged model's loss on {domain} texts is {loss:.3g} nats/token, above {LOSS_RATIO}× the "
                f"worst source's ({worst:.3g}): the merge has probably broken the model (check scaling_factor "
                "and weights)"
            )
    return SanityReport(losses=losses, warnings=tuple(warnings))


class _LossCache:
    """Source losses computed by earlier runs, one small JSON file each under `$HUBMERGE_CACHE/sanity/`.

    The key is the sha256 of everything the numbers depend on: the source's `Checkpoint.identity` (the Hub's
    sha256 of each weight file, or each local file's device, inode, size, mtime and ctime, which every write
    moves), its config, the token ids, the device type and the hubmerge and torch versions. A source without an identity
    is never cached; an unreadable or unwritable cache is ignored; `HUBMERGE_CACHE=off` turns it off.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    @classmethod
    def open(cls) -> _LossCache:
        from ..publish.lock import KnownHashes  # one setting and place for everything hubmerge remembers

        store = KnownHashes.location()
        return cls(store.parent / "sanity" if store is not None else None)

    def key(self, source: Checkpoint, ids: Mapping[str, list[list[int]]], device: torch.device) -> str | None:
        if self.folder is None or source.identity is None:
            return None
        import torch

        from .. import __version__

        facts = [source.identity, dict(source.config), ids, device.type, __version__, torch.__version__]
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str | None) -> dict[str, float] | None:
        if key is None or self.folder is None:
            return None
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            return {str(domain): float(loss) for domain, loss in data["losses"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def put(self, key: str | None, losses: Mapping[str, float]) -> None:
        if key is None or self.folder is None:
            return
        path = self.folder / f"{key}.json"
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"losses": dict(losses)}), encoding="utf-8")
            os.replace(partial, path)  # readers see the whole file or none
        except OSError:
            partial.unlink(missing_ok=True)
