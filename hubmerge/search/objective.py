"""What a trial scores: a weighted sum of the built-in loss and `[eval]` tasks' primary metrics.

The built-in objective needs no extra: the merged model's mean loss per token (nats) on texts, per domain,
either the sanity texts (`data/sanity_texts.json`: math, code, chat) or a text file whose paragraphs
(separated by blank lines) form the one domain "text". `loss` is the mean over the domains,
`loss.DOMAIN` one domain's. An `[eval]` task contributes its primary metric (lm-eval's first).

The direction follows lm-eval's `higher_is_better`: an objective of losses only is minimised and its score is
the weighted sum of the losses; as soon as a task takes part, the score is maximised, and each lower-is-better
term (losses, perplexities) enters it negated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import HubmergeError
from .space import LOSS, SearchSpec

__all__ = ["TrialFailed", "direction", "model_losses", "read_texts", "score"]


class TrialFailed(HubmergeError):
    """A trial whose merge cannot be scored (a non-finite loss or metric)."""


def direction(spec: SearchSpec) -> str:
    """ "minimize" for an objective of losses only, else "maximize"."""
    return "maximize" if spec.tasks else "minimize"


def read_texts(path: Path | None) -> dict[str, list[str]]:
    """The texts the loss is measured on, by domain."""
    if path is None:
        from ..sanity import sanity_texts

        return sanity_texts()
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    return {"text": [p for p in paragraphs if p]}


def model_losses(folder: Path, texts: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """The mean loss per token of the model in `folder` on `texts`, by domain, with its own tokenizer.

    The one place a search measures a loss: the sanity check's layer-by-layer forward pass (forward.py), so a
    trial is scored in a few hundred MB whatever the model's size. Raises `HubmergeError` with the reason
    when the folder cannot be scored (no tokenizer, texts of fewer than two tokens, a config it cannot run)."""
    import torch

    from ..errors import HubmergeError
    from ..forward import Checkpoint, Unrunnable
    from ..sanity import _domain_losses, _tokenize

    ids = _tokenize(folder, texts)
    if isinstance(ids, str):
        raise HubmergeError(f"cannot score the trial: {ids}")
    try:
        return _domain_losses(Checkpoint.local("the trial's merge", folder), ids, torch.device("cpu"))[0]
    except Unrunnable as exc:
        raise HubmergeError(f"cannot score the trial: {exc}") from None


def score(
    folder: Path, spec: SearchSpec, recipe: Path, eval_spec: Any = None, log: Any = None
) -> tuple[float, dict[str, float]]:
    """The objective of the merged model in `folder`: (score, {term: its value})."""
    terms: dict[str, float] = {}
    signs: dict[str, int] = {}
    if any(k == LOSS or k.startswith(LOSS + ".") for k in spec.objective):
        losses = model_losses(folder, read_texts(spec.texts))
        terms[LOSS] = sum(losses.values()) / len(losses)
        terms |= {f"{LOSS}.{domain}": value for domain, value in losses.items()}
        signs |= dict.fromkeys(terms, -1)
    if spec.tasks:
        from ..evaluate import Candidate, evaluate_models

        evaluation = evaluate_models(
            [Candidate("merged", "merged", folder)], folder, eval_spec, recipe, log or (lambda _: None)
        )
        for task in spec.tasks:
            _, found = evaluation.merged.primary(task)
            terms[task] = found.value
            signs[task] = 1 if found.higher_is_better else -1
    for name in spec.objective:
        if not math.isfinite(terms[name]):
            raise TrialFailed(f"the merged model's {name} is {terms[name]} (not finite)")
    if spec.tasks:
        total = sum(weight * signs[name] * terms[name] for name, weight in spec.objective.items())
    else:
        total = sum(weight * terms[name] for name, weight in spec.objective.items())
    return total, terms
