"""The numba loops behind `kernels` (kept apart so that importing `kernels` imports no numba, and at module
level so that numba's disk cache finds them again in the next process). Read `kernels` first."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_SHIFT = np.uint32(16)


@_jit
def widen(bits: Any) -> Any:
    """A bf16 value (its 16 bits) as the float32 it stands for, exactly."""
    return np.uint32(np.uint32(bits) << _SHIFT).view(np.float32)


@_jit
def magnitudes(base: Any, models: Any, out: Any) -> None:
    for i in range(len(models)):
        model = models[i]
        for j in range(base.shape[0]):
            out[i, j] = abs(widen(model[j]) - base[j])


@_jit
def counts(bits: Any, lows: Any, highs: Any, out: Any) -> None:
    # Row i: out[i, 0] the values below lows[i], out[i, 1 + v - lo] those equal to v in
    # [lo, hi), out[i, -1] those from hi up, v and lo, hi being float32 bit patterns.
    for i in range(bits.shape[0]):
        lo, hi = lows[i], highs[i]
        below, above = 0, 0
        row = out[i]
        for j in range(bits.shape[1]):
            v = np.int64(bits[i, j])
            below += v < lo
            above += v >= hi
            if lo <= v < hi:
                row[v - lo + 1] += 1
        row[0] += below
        row[row.shape[0] - 1] += above


_BLOCK = 512  # positions per block: every inner loop below runs over one block, which the compiler vectorises


@_jit
def ties_sum(
    base: Any, models: Any, cuts: Any, below: Any, scale: Any, values: Any, undecided: Any
) -> tuple[int, float, bool]:
    # The torch path (methods.ties: `_trimmed`, `_elected_sum`, then λ·merged + base), per position:
    #   τᵢ = float32(modelᵢ) − base; hardshrink by belowᵢ (the float32 just under the cut-off), which
    #   keeps τᵢ unless −belowᵢ <= τᵢ <= belowᵢ and writes +0 there;
    #   total = ((+0 + τ₀) + τ₁) + ... (torch's sum over dim 0 starts from +0);
    #   s = copysign(1, total); merged = s · (+0 + max(s·τ₀, 0) + ...), max keeping −0 and NaN as
    #   torch's clamp_(min=0) does; value = merged · λ + base, each rounded to float32.
    # Loops run model by model over a block of positions, branch-free, so that each is one vector loop.
    n, k = base.shape[0], len(models)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    tau = np.empty((k, _BLOCK), np.float32)
    total = np.empty(_BLOCK, np.float32)
    sign = np.empty(_BLOCK, np.float32)
    merged = np.empty(_BLOCK, np.float32)
    found = 0
    signs = 0
    nan = False
    for start in range(0, n, _BLOCK):
        m = min(_BLOCK, n - start)
        total[:m] = zero
        for i in range(k):
            model, cut, lam = models[i], cuts[i], below[i]
            row = tau[i]
            for j in range(m):
                t = widen(model[start + j]) - base[start + j]
                if cut > 0 and -lam <= t and t <= lam:
                    t = zero
                row[j] = t
                total[j] = total[j] + t
        merged[:m] = zero
        for j in range(m):
            sign[j] = one if not np.signbit(total[j]) else -one
        for i in range(k):
            row = tau[i]
            for j in range(m):
                x = sign[j] * row[j]
                merged[j] = merged[j] + (zero if x < zero else x)
        positive = 0
        negative = 0
        for j in range(m):
            v = merged[j] * sign[j]
            merged[j] = v
            values[start + j] = v * scale + base[start + j]
            positive += total[j] > zero
            negative += total[j] < zero
            nan |= total[j] != total[j]
        signs += positive - negative
        for j in range(m):
            if total[j] == zero and merged[j] > zero:
                undecided[found] = start + j
                found += 1
    return found, float(signs), nan
