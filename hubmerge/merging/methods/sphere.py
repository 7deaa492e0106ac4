"""Inner products for the geometric methods (slerp, nuslerp, multislerp, karcher, model_stock).

These methods need norms and dot products of whole tensors (or of whole rows or columns) before their
elementwise step. mergekit takes them with float32 reductions over the whole tensor, in an order that a
streaming merge cannot reproduce. Here a `Reduce` pass accumulates the Gram matrix G = X Xᵀ of the
method's vectors (one row of X per input: θᵢ, or τᵢ = θᵢ − θ_base) in float64, slice by slice: the
inner products of the float32 vectors to about 1e-16, so what separates the result from mergekit's is
mergekit's own float32 rounding. Each method documents the difference measured against mergekit.

Every quantity these methods need is a function of G: ‖xᵢ‖ = √Gᵢᵢ, cos(xᵢ, xⱼ) = Gᵢⱼ / √(Gᵢᵢ Gⱼⱼ), and the
norm of any combination Σ cᵢ xᵢ is √(cᵀ G c). A merge that stays in the span of its inputs can therefore
run all its scalar arithmetic on G and write Σ cᵢ xᵢ in one elementwise pass (multislerp, karcher).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from .base import Reduce, Slice, Stats, When

if TYPE_CHECKING:
    from torch import Tensor

Scope = Literal["tensor", "vector", "column"]


def task_vectors(s: Slice) -> list[Tensor]:
    """τᵢ = θᵢ − θ_base with a base, else θᵢ, in the compute dtype (as mergekit subtracts, in float32)."""
    if s.base is None:
        return [s.upcast(m) for m in s.models]
    return [m - s.base for m in s.models]


def gram(vectors: Sequence[Tensor], shape: tuple[int, ...], scope: Scope) -> Tensor:
    """Inner products ⟨xᵢ, xⱼ⟩ of one slice's `vectors` (of a tensor of `shape`), in float64.

    `tensor`: (n, n) over all elements. `vector`: (k, n, n), one per vector along the last dimension (the
    rows of a matrix, the whole of a 1-D tensor). `column`: (c, n, n), one per position in a row (the
    columns of a matrix, summed over the slice's rows). The float64 copies are made about `_BLOCK`
    elements per input at a time, so the scratch stays small beside the slice.
    """
    import torch

    n = len(vectors)
    if scope == "tensor":
        flat = [v.reshape(-1) for v in vectors]
        total = torch.zeros((n, n), dtype=torch.float64, device=flat[0].device)
        for first in range(0, flat[0].numel(), _BLOCK):
            x = torch.stack([v[first : first + _BLOCK] for v in flat]).to(torch.float64)
            total += x @ x.T
        return total
    length = (shape[-1] if shape else 1) if scope == "vector" else _row_size(shape)
    rows = [v.reshape(-1, length) for v in vectors]
    step = max(1, _BLOCK // length)
    blocks = []
    for first in range(0, rows[0].shape[0], step):
        x = torch.stack([r[first : first + step] for r in rows]).to(torch.float64)  # (n, rows, length)
        x = x.permute(1, 0, 2) if scope == "vector" else x.permute(2, 0, 1)
        blocks.append(torch.bmm(x, x.transpose(1, 2)))
    if scope == "vector":
        return torch.cat(blocks)
    total = blocks[0]
    for block in blocks[1:]:
        total += block
    return total


_BLOCK = 1 << 20  # elements per model converted to float64 at a time


def _row_size(shape: tuple[int, ...]) -> int:
    size = 1
    for d in shape[1:]:
        size *= d
    return size


def gram_pass(
    name: str,
    vectors: Callable[[Slice], Sequence[Tensor]],
    scope: Literal["tensor", "column"] = "tensor",
    when: When | None = None,
    shapes: Callable[[tuple[int, ...]], bool] | None = None,
) -> Reduce:
    """A pass summing `gram` of `vectors(slice)` over every slice of a tensor."""

    def step(s: Slice, stats: Stats, total: Tensor | None) -> Tensor:
        g = gram(vectors(s), s.shape, scope)
        return g if total is None else total.add_(g)

    return Reduce(name, step, when=when, shapes=shapes)


def one_vector(shape: tuple[int, ...]) -> bool:
    """A tensor that is a single vector (1-D, or a scalar): its "rows" are elements, so a per-row or
    per-vector quantity spans every slice and needs a pass."""
    return len(shape) <= 1


def local_gram(s: Slice, stats: Stats, name: str, vectors: Sequence[Tensor]) -> Tensor:
    """Per-vector (last dimension) inner products of this slice: from the pass `name` on a 1-D tensor
    (one vector spread over slices), else from the slice itself, which holds whole rows."""
    if name in stats:
        return stats[name].view(1, len(vectors), len(vectors))  # type: ignore[no-any-return]
    return gram(vectors, s.shape, "vector")
