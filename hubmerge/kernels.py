"""Compiled CPU loops (numba) for the hottest element-wise work, each equal bit for bit to the torch code it
replaces.

TIES spends its time in three loops over every element of every task vector: |τᵢ| for the magnitude
cut-off, the count of those magnitudes against the cut-off's bracket (`selection.kth_smallest`), and the
merge step itself (trim, elect, disjoint sum). In torch each is several passes over memory (a bf16 → float32
promotion, a subtraction, an abs, a clamp, a bincount, ...); here each is one loop that reads its inputs once
(bench/RESULTS.md, "TIES kernels"). Every kernel does the same IEEE float32 operations, in the same order, as
the torch path it stands for; `tests/test_kernels.py` holds each to that path on adversarial inputs (heavy
ties, signed zeros, infinities, subnormals).

The kernels take bf16 models only (Qwen2.5's dtype; a bf16 value is the top half of a float32, so widening
is a shift) and a float32 base; anything else, and any machine without numba, takes the torch path. Set
`HUBMERGE_KERNELS=torch` to force the torch path (what the tests compare against), `=numba` to use the kernels
even on the small pieces that `enabled` leaves to torch.
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["bracket_counts", "enabled", "magnitudes", "ties_sum"]


# Smaller work stays in torch: loading the compiled kernels costs ~1-2 s once a process.
_MIN_ELEMENTS = 1 << 16


def enabled(numel: int = _MIN_ELEMENTS) -> bool:
    """Whether the compiled kernels run on `numel` elements.

    `HUBMERGE_KERNELS`: "auto" (the default) on pieces of at least `_MIN_ELEMENTS` (real checkpoints; the
    tiny test models never load numba), "numba" on every piece, "torch" never. And numba must import.
    """
    mode = os.environ.get("HUBMERGE_KERNELS", "auto")
    if mode == "torch" or (mode != "numba" and numel < _MIN_ELEMENTS):
        return False
    return _compiled() is not None


@cache
def _compiled() -> dict[str, Any] | None:
    """The kernels (`_numba.py`), compiled on first use and cached on disk by numba for later processes."""
    try:
        from . import _numba
    except ImportError:  # pragma: no cover - numba is a dependency; a broken install still merges
        return None
    return {"magnitudes": _numba.magnitudes, "counts": _numba.counts, "ties_sum": _numba.ties_sum}


def _bf16_bits(tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...] | None:
    """The models' bf16 bit patterns as flat uint16 arrays (views, no copy of a contiguous slice), or None
    if one is not a CPU bf16 tensor."""
    import numpy as np
    import torch

    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
        return None
    return tuple(t.reshape(-1).view(torch.int16).numpy().view(np.uint16) for t in tensors)


def _float32_cpu(base: torch.Tensor) -> bool:
    import torch

    return base.dtype == torch.float32 and base.device.type == "cpu"


def magnitudes(base: torch.Tensor, models: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """|float32(modelᵢ) − base| as one (n, numel) float32 tensor, or None where the kernel does not apply."""
    import torch

    if not (enabled(base.numel()) and _float32_cpu(base)):
        return None
    rows = _bf16_bits(models)
    if rows is None:
        return None
    out = torch.empty((len(models), base.numel()), dtype=torch.float32)
    _compiled()["magnitudes"](base.reshape(-1).numpy(), rows, out.numpy())  # type: ignore[index]
    return out


def bracket_counts(chunk: torch.Tensor, bounds: dict[int, tuple[int, int]], counts: dict[int, Any]) -> bool:
    """Add a chunk's counts against each row's bracket into `counts` (see `selection.kth_smallest`).

    `chunk` is (rows, m) float32; bounds[i] = (lo, hi) bit patterns; counts[i] an int64 tensor of hi − lo + 2
    bins. Returns False, counting nothing, where the kernel does not apply.
    """
    import numpy as np
    import torch

    if not (enabled(chunk.numel()) and chunk.dtype == torch.float32 and chunk.device.type == "cpu"):
        return False
    rows = sorted(bounds)
    bits = chunk.contiguous().view(torch.int32).numpy()
    kernel = _compiled()["counts"]  # type: ignore[index]
    for i in rows:
        lo, hi = bounds[i]
        kernel(bits[i : i + 1], np.array([lo], np.int64), np.array([hi], np.int64), counts[i].numpy()[None])
    return True


def ties_sum(
    base: torch.Tensor, models: tuple[torch.Tensor, ...], cuts: list[float], scale: float
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """TIES with `merge_func = "sum"` on one slice: (λ·merged + base, the undecided flat positions, Σ sign
    of the elected totals), as `methods.ties.merge` computes them in torch; None where the kernel does not
    apply (or a total is NaN, whose sign torch's path decides)."""
    import numpy as np
    import torch

    if not (enabled(base.numel()) and _float32_cpu(base)):
        return None
    rows = _bf16_bits(models)
    if rows is None:
        return None
    flat = base.reshape(-1)
    cut = torch.tensor(cuts, dtype=torch.float32)
    below = torch.nextafter(cut, torch.tensor(-np.inf, dtype=torch.float32))
    values = torch.empty_like(flat)
    undecided = torch.empty(flat.numel(), dtype=torch.int64)
    found, signs, nan = _compiled()["ties_sum"](  # type: ignore[index]
        flat.numpy(), rows, cut.numpy(), below.numpy(), np.float32(scale), values.numpy(), undecided.numpy()
    )
    if nan:
        return None
    return values.view(base.shape), undecided[:found].clone(), int(signs)
