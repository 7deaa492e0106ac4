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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import HubmergeError
from .space import LOSS, SearchSpec

__all__ = ["TEXT_STAGES", "TrialFailed", "TrialPruned", "direction", "read_texts", "score", "staged_losses"]

TEXT_STAGES = 4  # stages of a single domain's texts (a `texts` file) when trials may be pruned


class TrialFailed(HubmergeError):
    """A trial whose merge cannot be scored (a non-finite loss or metric)."""


class TrialPruned(Exception):
    """A trial the pruner stopped after `step`: its objective so far was worse than the others' at that step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"pruned after step {step}")
        self.step = step


def direction(spec: SearchSpec) -> str:
    """ "minimize" for an objective of losses only, else "maximize"."""
    return "maximize" if spec.tasks else "minimize"


def read_texts(path: Path | None) -> dict[str, list[str]]:
    """The texts the loss is measured on, by domain."""
    if path is None:
        from ..quality.sanity import sanity_texts

        return sanity_texts()
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    return {"text": [p for p in paragraphs if p]}


def _stages(ids: dict[str, list[list[int]]], staged: bool) -> list[dict[str, list[list[int]]]]:
    """The token ids in the stages a trial measures them in: all at once, or, when the trial may be pruned, one
    stage per domain (a single domain: up to TEXT_STAGES batches of its texts, in order)."""
    if not staged:
        return [ids]
    if len(ids) > 1:
        return [{domain: sequences} for domain, sequences in ids.items()]
    ((domain, sequences),) = ids.items()
    n = min(TEXT_STAGES, len(sequences))
    return [{domain: sequences[i * len(sequences) // n : (i + 1) * len(sequences) // n]} for i in range(n)]


def staged_losses(
    folder: Path, texts: Mapping[str, Sequence[str]], staged: bool
) -> Iterator[tuple[dict[str, float], bool]]:
    """The mean loss per token of the model in `folder` on `texts`, by domain: after each stage (`_stages`),
    (the domains measured so far, over the texts measured so far; whether it was the last stage).

    The one place a search measures a loss: the sanity check's layer-by-layer forward pass (forward.py), so a
    trial is scored in a few hundred MB whatever the model's size; each stage is one pass. Raises
    `HubmergeError` with the reason when the folder cannot be scored (no tokenizer, texts of fewer than two
    tokens, a config it cannot run)."""
    import torch

    from ..quality.forward import Checkpoint, Unrunnable, token_losses
    from ..quality.sanity import _tokenize

    ids = _tokenize(folder, texts)
    if isinstance(ids, str):
        raise HubmergeError(f"cannot score the trial: {ids}")
    checkpoint = Checkpoint.local("the trial's merge", folder)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    stages = _stages(ids, staged)
    for number, stage in enumerate(stages):
        sequences = [s for domain in stage.values() for s in domain]
        try:
            per_sequence = token_losses(checkpoint, sequences, torch.device("cpu")).per_sequence
        except Unrunnable as exc:
            raise HubmergeError(f"cannot score the trial: {exc}") from None
        first = 0
        for domain, items in stage.items():
            per_token = torch.cat(per_sequence[first : first + len(items)]).double()
            sums[domain] = sums.get(domain, 0.0) + float(per_token.sum())
            counts[domain] = counts.get(domain, 0) + per_token.numel()
            first += len(items)
        yield {domain: sums[domain] / counts[domain] for domain in sums}, number == len(stages) - 1


def _total(spec: SearchSpec, terms: Mapping[str, float], signs: Mapping[str, int]) -> float:
    """The objective over the `terms` measured so far (all of them: the trial's score)."""
    weights = {name: w for name, w in spec.objective.items() if name in terms}
    if spec.tasks:
        return sum(weight * signs[name] * terms[name] for name, weight in weights.items())
    return sum(weight * terms[name] for name, weight in weights.items())


def _loss_terms(losses: Mapping[str, float]) -> dict[str, float]:
    return {LOSS: sum(losses.values()) / len(losses)} | {f"{LOSS}.{d}": v for d, v in losses.items()}


def score(
    folder: Path,
    spec: SearchSpec,
    recipe: Path,
    eval_spec: Any = None,
    log: Any = None,
    report: Callable[[int, float], bool] | None = None,
) -> tuple[float, dict[str, float]]:
    """The objective of the merged model in `folder`: (score, {term: its value}).

    With `report`, the loss is measured in stages (`_stages`) and `report(step, objective so far)` is called
    after each; when it returns True and work remains, the trial stops with `TrialPruned`. The objective so
    far counts the terms measured so far, so it compares across trials at the same step (every trial
    measures the same texts in the same order); `[eval]` tasks are measured after the last stage."""
    terms: dict[str, float] = {}
    signs: dict[str, int] = {}
    if any(k == LOSS or k.startswith(LOSS + ".") for k in spec.objective):
        staged = staged_losses(folder, read_texts(spec.texts), report is not None)
        for step, (losses, last) in enumerate(staged):
            terms = _loss_terms(losses)
            signs = dict.fromkeys(terms, -1)
            _check_finite(spec, terms)
            if (
                report is not None
                and report(step, _total(spec, terms, signs))
                and not (last and not spec.tasks)
            ):
                raise TrialPruned(step)
    if spec.tasks:
        from ..quality.evaluate import Candidate, evaluate_models

        evaluation = evaluate_models(
            [Candidate("merged", "merged", folder)], folder, eval_spec, recipe, log or (lambda _: None)
        )
        for task in spec.tasks:
            _, found = evaluation.merged.primary(task)
            terms[task] = found.value
            signs[task] = 1 if found.higher_is_better else -1
    _check_finite(spec, terms)
    return _total(spec, terms, signs), terms


def _check_finite(spec: SearchSpec, terms: Mapping[str, float]) -> None:
    for name in spec.objective:
        if name in terms and not math.isfinite(terms[name]):
            raise TrialFailed(f"the merged model's {name} is {terms[name]} (not finite)")
