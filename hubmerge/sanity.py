"""The quick sanity check after every merge: does the output load, is it finite, does it still model text?

It needs no extra (torch and transformers only) and takes seconds on small models:

1. the output folder loads with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=False)`;
2. every tensor of the loaded model is finite;
3. its mean loss (nats per token) on a few short texts per domain (math, code, chat; `data/sanity_texts.json`,
   written for hubmerge) is compared with each source's loss on the same texts, with the output's tokenizer.

A merge fails the check when, in some domain, its loss is above `LOSS_RATIO` (1.5) times the worst source's
loss there, or not finite: a merge that broke the model (a scaling factor of 50, a wrong weight, a dtype
overflow) lands far above that, while a working merge lands between its sources or close to them. A failed
check is a loud warning in the terminal and in the card, not an error: the user decides.

Models are loaded one at a time. When the largest would not fit in the memory available now (parameter
count × bytes per parameter + `_OVERHEAD_BYTES`), the check is skipped with a note instead.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LOSS_RATIO", "SanityReport", "available_memory", "check", "sanity_texts"]

LOSS_RATIO = 1.5
TEXTS = Path(__file__).parent / "data" / "sanity_texts.json"
# The process with torch and transformers imported, plus activations for a few short texts.
_OVERHEAD_BYTES = 1 << 30


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


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux `MemAvailable`, else free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _domain_losses(model: Any, tokenizer: Any, texts: Mapping[str, Sequence[str]]) -> dict[str, float]:
    import torch

    losses: dict[str, float] = {}
    with torch.no_grad():
        for domain, items in texts.items():
            total, tokens = 0.0, 0
            for text in items:
                ids = tokenizer(text, return_tensors="pt").input_ids
                # The loss is a mean over the len - 1 predicted tokens; weight each text by them.
                loss = model(input_ids=ids, labels=ids).loss.float().item()
                total += loss * (ids.shape[1] - 1)
                tokens += ids.shape[1] - 1
            losses[domain] = total / tokens
    return losses


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    # transformers draws a "Loading weights" bar per model; the merge has its own progress and -q.
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    model.eval()
    return model


def check(
    output: Path, sources: Sequence[tuple[str, Path]], parameter_count: int, bytes_per_parameter: int
) -> SanityReport:
    """Check the merged model in `output` against `sources` ((label, folder) pairs, in recipe order)."""
    needed = parameter_count * bytes_per_parameter + _OVERHEAD_BYTES
    available = available_memory()
    if needed > available:
        return SanityReport(
            skipped=f"the model needs about {needed / 2**30:.1f} GiB to load and {available / 2**30:.1f} GiB "
            "are available; run it on a larger machine or pass --no-sanity"
        )
    from transformers import AutoTokenizer

    texts = sanity_texts()
    try:
        tokenizer = AutoTokenizer.from_pretrained(output, trust_remote_code=False)
    except Exception as exc:  # no usable tokenizer in the output: nothing to measure the loss with
        return SanityReport(skipped=f"the output's tokenizer does not load ({type(exc).__name__}: {exc})")
    try:
        model = _load(output)
    except Exception as exc:  # any failure to load is the finding, not a crash
        return SanityReport(
            warnings=(f"the merged model does not load in transformers ({type(exc).__name__}: {exc})",)
        )
    warnings = [
        f"tensor {name} of the merged model has non-finite values (inf or NaN)"
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    losses = {"merged": _domain_losses(model, tokenizer, texts)}
    del model
    for label, folder in sources:
        try:
            model = _load(folder)
        except Exception as exc:  # a source transformers cannot load leaves nothing to compare with
            return SanityReport(
                losses,
                tuple(warnings),
                f"source {label} does not load in transformers ({type(exc).__name__})",
            )
        losses[label] = _domain_losses(model, tokenizer, texts)
        del model
        gc.collect()
    for domain, merged in losses["merged"].items():
        worst = max((losses[label][domain] for label, _ in sources), default=math.inf)
        if not math.isfinite(merged) or merged > LOSS_RATIO * worst:
            warnings.append(
                f"the merged model's loss on {domain} texts is {merged:.3g} nats/token, above {LOSS_RATIO}× the "
                f"worst source's ({worst:.3g}): the merge has probably broken the model (check scaling_factor "
                "and weights)"
            )
    return SanityReport(losses=losses, warnings=tuple(warnings))
