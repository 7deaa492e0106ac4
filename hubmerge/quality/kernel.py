"""The diagnostics' compiled single-pass kernel (hubmerge/_kernels.c), through ctypes.

`pip install` compiles it where a C compiler is found (setup.py; the build goes on without one). Where it is
missing, or for inputs it does not take, `measure` returns None and the diagnostics take their torch path:
the same counts, the same norms and cosines to 1e-12 (tests/test_diagnostics_kernel.py and
test_diagnostics_fused.py). ctypes releases the GIL for the call, so the two merge threads measure their
pieces at the same time.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["MISSING", "Counts", "available", "measure"]

ENABLED = True  # tests switch it off to hold the torch path to the kernel's numbers
MISSING = (
    "merge diagnostics measured with torch, at 2-5x the cost of hubmerge's C kernel, which is not built "
    "(install gcc or clang and reinstall hubmerge, or merge with --no-stats)"
)
MAX_MODELS = 8  # the kernel's copies (one per number of models, MAX_MODELS in _kernels.c)

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_HEAD, _PER_MODEL = 3, 6  # the layout of the kernel's counts (HM_HEAD, HM_PER_MODEL in _kernels.c)


class Counts(NamedTuple):
    """One piece's diagnostics from the kernel; the trimming counts are zero for a method that does not trim."""

    gram: torch.Tensor  # (n, n) float64
    conflict: int
    sign_sum: int  # Σ elected signs (trimming)
    model_conflict: torch.Tensor  # (n,) int64, and the rest likewise
    kept: torch.Tensor
    dropped: torch.Tensor
    undecided_pos: torch.Tensor
    undecided_neg: torch.Tensor
    nan: torch.Tensor


@functools.cache
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("hubmerge._kernels")
    if spec is None or spec.origin is None:
        return None  # built without a C compiler
    library = ctypes.CDLL(spec.origin)
    function = library.hubmerge_measure
    function.restype = ctypes.c_int
    function.argtypes = [
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return library


def available() -> bool:
    """Whether the compiled kernel is installed (and not switched off)."""
    return ENABLED and _library() is not None


def measure(
    base: torch.Tensor, models: Sequence[torch.Tensor], shrink: Sequence[float] | None
) -> Counts | None:
    """The diagnostics of one piece, τᵢ = models[i] − base in float32; `shrink`, for a method that trims,
    is per model the hardshrink threshold of its cut-off (< 0: keep every entry). None where the kernel is
    not installed or does not take these inputs (a device, a dtype other than float32 and bfloat16, more
    than `MAX_MODELS` models): the caller measures with torch then."""
    library = _library() if ENABLED else None
    inputs = [base, *models]
    if (
        library is None
        or any(t.device.type != "cpu" or t.dtype not in _DTYPES or not t.is_contiguous() for t in inputs)
        or not 0 < len(models) <= MAX_MODELS
        or any(t.numel() != base.numel() for t in models)
    ):
        return None
    n = len(models)
    # One call per piece (~1,900 for a 0.5B merge): the Python around it is kept to a few small allocations.
    pointers = (ctypes.c_void_p * n)(*(m.data_ptr() for m in models))
    dtypes = (ctypes.c_int32 * n)(*(_DTYPES[m.dtype] for m in models))
    thresholds = None if shrink is None else (ctypes.c_float * n)(*shrink)
    gram = torch.empty((n, n), dtype=torch.float64)
    counts = np.empty(_HEAD + _PER_MODEL * n, dtype=np.int64)
    status = library.hubmerge_measure(
        n,
        base.numel(),
        base.data_ptr(),
        _DTYPES[base.dtype],
        pointers,
        dtypes,
        thresholds,
        gram.data_ptr(),
        counts.__array_interface__["data"][0],
    )
    if status != 0:
        return None  # a number of models it was not built for
    per_model = counts[_HEAD:].reshape(n, _PER_MODEL).T.copy()  # one row per field, each contiguous
    return Counts(
        gram,
        int(counts[0]),
        int(counts[1] - counts[2]),
        *(torch.from_numpy(row) for row in per_model),
    )
