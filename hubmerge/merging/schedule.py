"""Per-tensor parameter values: a scalar, a gradient over the layers, or filters on the tensor name.

mergekit's `ParameterSetting`, with its rules (checked against mergekit 0.1.5 in tests/test_schedule.py):

- a **gradient** `[v₀, v₁, …, vₖ]` spreads its anchors evenly over t ∈ [0, 1] and interpolates linearly;
  a layer tensor gets t = layer / (num_layers − 1) (t = 0 with one layer), every other tensor (embedding,
  final norm, `lm_head`) t = 0, i.e. the first value. Lists of bools or strings pick `values[int(t·k)]`;
- **filters** `[{filter = "mlp", value = 0.7}, {value = 0.5}]`: the first rule whose `filter` is a
  substring of the tensor name wins (no filter, or `"*"`, matches every tensor); a rule's value may itself
  be a gradient.

Resolution order (`resolve_value`): the model's own setting, then the recipe's `[parameters]`, then the
method's default. Shared parameters match filters against the output tensor's name, per-model ones
against the name of the tensor read from that model (they differ only for a tied model's `lm_head`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Filter",
    "Gradient",
    "Scalar",
    "Setting",
    "describe",
    "evaluate",
    "is_schedule",
    "layer_position",
    "scalars",
    "to_json",
]

Scalar = float | int | str | bool


@dataclass(frozen=True)
class Gradient:
    """Anchors spread evenly over the layers, interpolated linearly (numbers) or picked (bools, strings)."""

    values: tuple[Scalar, ...]

    def at(self, t: float) -> Scalar:
        values = self.values
        if len(values) == 1:
            return values[0]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        # Same arithmetic as numpy.interp over np.linspace(0, 1, k + 1), which mergekit uses.
        position = t * (len(values) - 1)
        low = min(math.floor(position), len(values) - 2)
        anchor_low = low / (len(values) - 1)
        anchor_high = (low + 1) / (len(values) - 1)
        a, b = float(values[low]), float(values[low + 1])
        if t <= anchor_low:
            return a
        if t >= anchor_high:
            return b
        slope = (b - a) / (anchor_high - anchor_low)
        return slope * (t - anchor_low) + a


@dataclass(frozen=True)
class Filter:
    """One conditional rule: `value` applies to tensors whose name contains `filter` (None: every tensor)."""

    value: Scalar | Gradient
    filter: str | None = None

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in name


Setting = Scalar | Gradient | tuple[Filter, ...]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_position(name: str, num_layers: int) -> float:
    """t for a tensor: layer / (num_layers − 1) inside the decoder layers, 0 for every other tensor."""
    match = _LAYER.search(name)
    if match is None or num_layers <= 1:
        return 0.0
    return int(match.group(1)) / (num_layers - 1)


def evaluate(setting: Setting, name: str, t: float) -> Scalar | None:
    """The value `setting` gives tensor `name` at layer position `t`; None when no filter matches."""
    if isinstance(setting, tuple):
        rule = next((r for r in setting if r.matches(name)), None)
        if rule is None:
            return None
        setting = rule.value
    return setting.at(t) if isinstance(setting, Gradient) else setting


def is_schedule(setting: Setting) -> bool:
    """True for a gradient or a filter list: a value that may differ between tensors."""
    return isinstance(setting, (Gradient, tuple))


def describe(setting: Setting) -> str:
    """A setting as a recipe writes it, for messages and the card."""
    if isinstance(setting, Gradient):
        return "[" + ", ".join(map(describe, setting.values)) + "]"
    if isinstance(setting, tuple):
        rules = (
            (
                "{"
                + (f"filter = {json.dumps(r.filter)}, " if r.filter is not None else "")
                + f"value = {describe(r.value)}"
                + "}"
            )
            for r in setting
        )
        return "[" + ", ".join(rules) + "]"
    if isinstance(setting, bool):
        return "true" if setting else "false"  # as TOML writes it
    return json.dumps(setting) if isinstance(setting, str) else repr(setting)


def to_json(setting: Setting) -> Any:
    """A setting as the recipe's TOML wrote it, as JSON (lock file, report, plan --json)."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, tuple):
        return [
            {**({"filter": r.filter} if r.filter is not None else {}), "value": to_json(r.value)}
            for r in setting
        ]
    return setting


def scalars(setting: Setting) -> Sequence[Scalar]:
    """Every scalar a setting can produce (its anchors, its rules' values), for range checks."""
    if isinstance(setting, Gradient):
        return setting.values
    if isinstance(setting, tuple):
        return [v for r in setting for v in scalars(r.value)]
    return [setting]
