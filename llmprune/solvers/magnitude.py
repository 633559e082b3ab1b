"""Magnitude pruning: the floor every calibrated method must beat."""

from __future__ import annotations

from torch import Tensor

from llmprune.pattern import Pattern
from llmprune.quant import QuantSpec
from llmprune.solvers.masks import magnitude_mask
from llmprune.solvers.result import SolveResult
from llmprune.solvers.rtn import then_rtn


def magnitude(
    W: Tensor, H: Tensor | None, sparsity: float, pattern: Pattern | None = None, quant: QuantSpec | None = None,
    **_: object,
) -> SolveResult:
    """Zero the smallest |w| over the whole matrix (or within each N:M group), then round the rest to
    nearest when quantizing. H is not used."""
    mask = magnitude_mask(W, sparsity, pattern)
    return then_rtn(W, SolveResult(weight=W.masked_fill(mask, 0), mask=mask), quant, H)


def round_to_nearest(
    W: Tensor, H: Tensor | None, sparsity: float, pattern: Pattern | None = None, quant: QuantSpec | None = None,
    **kw: object,
) -> SolveResult:
    """``--method rtn``: the magnitude solver (no mask at sparsity 0), its kept weights rounded to nearest."""
    return magnitude(W, H, sparsity, pattern, quant, **kw)
