"""The errors hubmerge raises, each rendered by the CLI as one line that says what to do next.

    HubmergeError                     exit 1: anything else we anticipated
     ├── RecipeError                  exit 2: the recipe file is not valid (syntax, schema, parameters)
     │    └── ConfigImportError       exit 2: a mergekit config `import-mergekit` cannot convert (one line a key)
     ├── SourceError                  exit 3: a source model cannot be found, read or downloaded
     ├── IncompatibleSourcesError     exit 4: the sources cannot be merged together (names, shapes, architecture)
     ├── CardError                    exit 5: the model card cannot be rendered (template, license)
     ├── PublishError                 exit 6: the result cannot be pushed (token, permissions, Hub errors)
     ├── EvalError                    exit 7: the evaluation cannot run (lm-eval missing, a task fails)
     │    └── GateError               exit 8: the merge misses an `[eval] require` score; it was not pushed
     └── Cancelled                    exit 1: a caller of the API cancelled the merge (`merge(cancel=...)`)

Exit code 130 means interrupted and 70 an internal error, a bug (run with HUBMERGE_DEBUG=1 for a traceback).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "Cancelled",
    "CardError",
    "ConfigImportError",
    "EvalError",
    "GateError",
    "HubmergeError",
    "IncompatibleSourcesError",
    "PublishError",
    "RecipeError",
    "SourceError",
]


class HubmergeError(Exception):
    """Base class: `str(error)` is a complete, actionable sentence."""

    exit_code = 1


class RecipeError(HubmergeError, ValueError):
    exit_code = 2


class ConfigImportError(RecipeError):
    """Every part of a mergekit config that has no equivalent recipe, one complete sentence each."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


class SourceError(HubmergeError):
    exit_code = 3


class IncompatibleSourcesError(HubmergeError):
    exit_code = 4


class CardError(HubmergeError):
    exit_code = 5


class PublishError(HubmergeError):
    exit_code = 6


class EvalError(HubmergeError):
    exit_code = 7


class GateError(EvalError):
    exit_code = 8

    def __init__(self, message: str, summary: str = "") -> None:
        super().__init__(message)
        self.summary = summary  # the results table in Markdown, for the job summary


class Cancelled(HubmergeError):
    """The merge was cancelled through `hubmerge.merge(cancel=event)`; the output folder was left as it was.
    The CLI never raises it: Ctrl-C there is exit 130 (cli.py)."""
