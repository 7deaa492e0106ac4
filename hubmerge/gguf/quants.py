"""GGML block quantizers in torch: Q8_0, Q5_0, Q5_1 and the K-quants Q4_K, Q5_K, Q6_K.

Each follows llama.cpp's reference quantizer (`quantize_row_*_ref` in ggml/src/ggml-quants.c, the path
`llama-quantize` takes without an importance matrix), vectorised across blocks. To give the same bytes,
every float operation is done in float32 in the reference's order: sums are folded left to right one
element at a time (a column per step, across all blocks at once), never reduced pairwise, and rounding
follows `nearest_int` (half to even) or `roundf` (half away from zero) where the reference uses each.
The reference is compiled without floating-point contraction (no fused multiply-add), as C specifies
by default; a build of llama.cpp with `-march=native` may contract and then differ in rare blocks.

`quantize(rows, qtype)` takes a float32 matrix and returns its blocks as uint8, one row of bytes per row.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["QUANTIZERS", "quantize"]

QK_K = 256
_CHUNK = 1 << 18  # values quantized at a time: bounds the working memory of the K-quants' search


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 [n] → the IEEE half of each (round to nearest even), as [n, 2] little-endian bytes."""
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _fp16_round(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).to(torch.float32)


def _nearest_int(values: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `nearest_int`: the magic-number rounding, half to even."""
    return torch.round(values)


def _roundf(values: torch.Tensor) -> torch.Tensor:
    """C's `roundf`: half away from zero (torch.round goes half to even)."""
    whole = torch.trunc(values)
    tie = (values - whole).abs() == 0.5
    return torch.where(tie, whole + torch.sign(values), torch.round(values))


def _over(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """`numerator / denominator` rounded once, as C divides (`float / tensor` in torch multiplies by the
    reciprocal, which rounds twice)."""
    return torch.full_like(denominator, numerator) / denominator


def _fold(columns: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension strictly left to right, as a C loop `s += a[i]` does."""
    total = columns[0].clone()
    for column in columns[1:]:
        total += column
    return total


def _first_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The signed value of the first element with the largest magnitude in each row (blocks [n, k])."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True)).squeeze(1)


# ---------------------------------------------------------------- 32-value blocks


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1) / 127
    inverse = torch.where(d != 0, _over(1.0, d), torch.zeros_like(d))
    qs = _roundf(blocks * inverse[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), qs], dim=1)


def _pack_q5(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5-bit values [n, 32] → (qh [n, 4] high bits as a little-endian uint32, qs [n, 16] low nibbles)."""
    q = q.to(torch.int64)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    bits = (q >> 4) & 1
    qh = (bits << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    qh_bytes = torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], dim=1)
    return qh_bytes.to(torch.uint8), qs.to(torch.uint8)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    d = _first_absmax(blocks) / -16
    inverse = torch.where(d != 0, _over(1.0, d), torch.zeros_like(d))
    q = torch.clamp(torch.trunc(blocks * inverse[:, None] + 16.5), max=31)
    qh, qs = _pack_q5(q)
    return torch.cat([_fp16_bytes(d), qh, qs], dim=1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    low, high = blocks.amin(dim=1), blocks.amax(dim=1)
    d = (high - low) / 31
    inverse = torch.where(d != 0, _over(1.0, d), torch.zeros_like(d))
    q = torch.trunc((blocks - low[:, None]) * inverse[:, None] + 0.5)
    qh, qs = _pack_q5(q)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), qh, qs], dim=1)


# ---------------------------------------------------------------- K-quants


def _make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`make_qkx2_quants` for many groups at once: x and weights are [n, m] (a group per column).

    Returns (scale [m], the_min [m], levels [n, m]): the affine grid `scale * level - the_min` whose
    weighted squared error is the least of the candidates the reference tries, in its order.
    """
    low = torch.clamp(x.amin(dim=0), max=0.0)
    high = x.amax(dim=0)
    flat = high == low
    ones = torch.ones_like(high)
    span = torch.where(flat, ones, high - low)
    sum_w = _fold(weights)
    sum_x = _fold(weights * x)
    iscale = _over(nmax, span)
    scale = _over(1.0, iscale)
    levels = torch.clamp(_nearest_int(iscale * (x - low)), 0, nmax)
    diff = scale * levels + low - x
    best_error = _fold(weights * (diff * diff))
    # the winning candidate's levels are recomputed once at the end from its iscale and the min it used
    best_iscale, best_from = iscale, low
    for step in range(nstep + 1):
        numerator = np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax)
        # the reference moves `min` to each better candidate's, so later candidates span from there
        iscale = _over(float(numerator), torch.where(flat, ones, high - low))
        trial = torch.sub(x, low).mul_(iscale).round_().clamp_(0, nmax)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _fold(wl), _fold(wl.mul(trial)), _fold(wl.mul_(x))
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, ones)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive_min = this_min > 0
        this_min = torch.where(positive_min, 0.0, this_min)
        this_scale = torch.where(positive_min, sum_xl / sum_l2, this_scale)
        diff = trial.mul_(this_scale).add_(this_min).sub_(x)
        error = _fold(diff.mul_(diff).mul_(weights))
        better = (det > 0) & (error < best_error)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_from = torch.where(better, low, best_from)
        low = torch.where(better, this_min, low)
    levels = torch.clamp(_nearest_int(best_iscale * (x - best_from)), 0, nmax)
    levels = torch.where(flat, 0.0, levels)
    scale = torch.where(flat, 0.0, scale)
    return scale, -low, levels


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins per super-block [n, 8] → the 12 bytes of `block_q4_K.scales`."""
    packed = torch.zeros(ls.shape[0], 12, dtype=torch.int64)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return packed.to(torch.uint8)


def _affine_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """The part Q4_K and Q5_K share: per 32-value group an affine grid, its scale and min in 6 bits
    under a super-block fp16 (d, dmin), then every value's level on the rounded grid.

    Returns (d bytes [n, 2], dmin bytes [n, 2], scales [n, 12], levels [n, 8, 32] int64).
    """
    blocks = x.reshape(-1, 8, 32)
    n = blocks.shape[0]
    groups = blocks.reshape(-1, 32).T.contiguous()  # [32, n * 8]: a group per column
    sum_x2 = _fold(groups * groups)
    # sqrtf is correctly rounded; torch's float32 sqrt may be off by an ulp, float64's rounds back exactly
    av_x = torch.sqrt((sum_x2 / 32).double()).float()
    weights = av_x + groups.abs()
    scales, mins, levels = _make_qkx2_quants(groups, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    levels = levels.T.reshape(n, 8, 32)
    # the reference's running maxima start at +0 and move only to a larger value (never to -0)
    max_scale = torch.where(scales.amax(dim=1) > 0, scales.amax(dim=1), 0.0)
    max_min = torch.where(mins.amax(dim=1) > 0, mins.amax(dim=1), 0.0)
    inv_scale = torch.where(max_scale > 0, _over(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, _over(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    ls = torch.clamp(_nearest_int(inv_scale[:, None] * scales).to(torch.int64) & 0xFF, max=63)
    lm = torch.clamp(_nearest_int(inv_min[:, None] * mins).to(torch.int64) & 0xFF, max=63)
    d, dmin = max_scale / 63.0, max_min / 63.0
    group_d = _fp16_round(d)[:, None] * ls.to(torch.float32)
    group_m = _fp16_round(dmin)[:, None] * lm.to(torch.float32)
    nonzero = group_d != 0
    safe_d = torch.where(nonzero, group_d, torch.ones_like(group_d))
    requantized = torch.clamp(_nearest_int((blocks + group_m[:, :, None]) / safe_d[:, :, None]), 0, nmax)
    levels = torch.where(nonzero[:, :, None], requantized, levels).to(torch.int64)
    return _fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_k4(ls, lm), levels


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, levels = _affine_k(x, 15, -1.0, 20)
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    return torch.cat([d, dmin, scales, qs], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, levels = _affine_k(x, 31, -0.5, 15)
    pairs = levels.reshape(-1, 4, 2, 32)
    low, high = pairs & 0xF, pairs >> 4
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    shifts = torch.arange(8, dtype=torch.int64).reshape(1, 4, 2, 1)
    qh = (high << shifts).sum(dim=(1, 2))
    return torch.cat([d, dmin, scales, qh.to(torch.uint8), qs.to(torch.uint8)], dim=1)


def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)` for many groups: x is [n, m], a group per
    column. Returns (scale [m], levels [n, m] in 0..2*nmax-1)."""
    peak = _first_absmax(x.T)
    empty = peak.abs() < 1e-15
    safe_peak = torch.where(empty, torch.ones_like(peak), peak)
    weights = x * x
    weighted_x = weights * x

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        level = torch.mul(x, iscale).round_().clamp_(-nmax, nmax - 1)
        return _fold(weighted_x * level), _fold(level.mul(weights).mul_(level))

    best_iscale = _over(-float(nmax), safe_peak)
    sumlx, suml2 = trial(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = -np.float32(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        iscale = _over(float(factor), safe_peak)
        sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    levels = torch.clamp(_nearest_int(best_iscale * x), -nmax, nmax - 1) + nmax
    scale = torch.where(empty, torch.zeros_like(scale), scale)
    levels = torch.where(empty, torch.zeros_like(levels), levels)
    return scale, levels


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 16, 16)
    n = blocks.shape[0]
    groups = blocks.reshape(-1, 16).T.contiguous()  # [16, n * 16]
    scales, levels = _make_qx_quants_rmse1(groups, 32)
    scales = scales.reshape(n, 16)
    levels = levels.T.reshape(n, 16, 16)
    max_scale = _first_absmax(scales)
    empty = max_scale.abs() < 1e-15
    iscale = _over(-128.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d = _over(1.0, iscale)
    sub_scales = torch.clamp(_nearest_int(iscale[:, None] * scales), max=127)
    group_d = _fp16_round(d)[:, None] * sub_scales
    nonzero = group_d != 0
    safe_d = torch.where(nonzero, group_d, torch.ones_like(group_d))
    requantized = torch.clamp(_nearest_int(blocks / safe_d[:, :, None]), -32, 31) + 32
    levels = torch.where(nonzero[:, :, None], requantized, levels).to(torch.int64)
    quarters = levels.reshape(n, 2, 4, 32)  # [half of 128][quarter of 32][value]
    low, high = quarters & 0xF, quarters >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    qh = (high << (2 * torch.arange(4, dtype=torch.int64)).reshape(1, 1, 4, 1)).sum(dim=2)
    d_bytes = _fp16_bytes(torch.where(empty, torch.zeros_like(d), d))
    scale_bytes = sub_scales.to(torch.int8).view(torch.uint8)
    body = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64)], dim=1).to(torch.uint8)
    out = torch.cat([body, scale_bytes, d_bytes], dim=1)
    return torch.where(empty[:, None], torch.zeros_like(out), out)


QUANTIZERS = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}


def quantize(rows: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """The GGML blocks of `rows` (float32 [..., n], n a multiple of the block size): uint8 [..., bytes]."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    width = rows.shape[-1]
    if width % block_size:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block_size} values, not {width}")
    flat = rows.reshape(-1).to(torch.float32)
    per_chunk = max(block_size, _CHUNK // block_size * block_size)
    starts = range(0, flat.numel(), per_chunk)
    # Chunks side by side on one-thread torch: the operations are small, and OpenMP teams that spin
    # between them cost 20x the time on a busy 2-core machine. Every chunk is computed alone by the same
    # operations, so the bytes do not depend on the number of threads.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(cores, len(starts)))) as pool:
            parts = list(pool.map(lambda start: QUANTIZERS[qtype](flat[start : start + per_chunk]), starts))
    finally:
        torch.set_num_threads(threads)
    out = torch.cat(parts) if parts else torch.empty(0, type_size, dtype=torch.uint8)
    return out.reshape(*rows.shape[:-1], width // block_size * type_size)
