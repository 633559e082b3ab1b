"""Magnitude pruning: the floor every calibrated method must beat."""

from __future__ import annotations

from torch import Tensor

from llmprune.quant import QuantSpec
from llmprune.recipe import Pattern, n_pruned
from llmprune.solvers.masks import nm_mask, smallest_k_mask
from llmprune.solvers.result import SolveResult
from llmprune.solvers.rtn import then_rtn


def magnitude(
    W: Tensor, H: Tensor | None, sparsity: float, pattern: Pattern | None = None, quant: QuantSpec | None = None,
    **_: object,
) -> SolveResult:
    """Zero the smallest |w| over the whole matrix (or within each N:M group), then round the rest to
    nearest when quantizing. H is not used."""
    score = W.abs().float()
    mask = nm_mask(score, pattern) if pattern else smallest_k_mask(score, n_pruned(sparsity, W.numel()))
    return then_rtn(W, SolveResult(weight=W.masked_fill(mask, 0), mask=mask), quant, H)
