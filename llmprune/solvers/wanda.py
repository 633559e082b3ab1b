"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row; no weight update."""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.pattern import Pattern
from llmprune.quant import QuantSpec
from llmprune.solvers.masks import nm_mask, row_balanced_mask
from llmprune.solvers.result import SolveResult, input_sq_norms
from llmprune.solvers.rtn import then_rtn


def wanda(
    W: Tensor, H: Tensor, sparsity: float, pattern: Pattern | None = None, quant: QuantSpec | None = None,
    **_: object,
) -> SolveResult:
    """diag(H) = 2/n * sum_t x_tj², so sqrt(diag H) is ||X_j||_2 up to a constant that cancels per row; H may
    be that diagonal alone (1-D), all Wanda needs. Quantizing follows the mask with round to nearest.

    Example: W = [[1, 2], [3, 1]], ||X|| = [4, 1] -> scores [[4, 2], [12, 1]]; at 50% row 0 loses w=2 and
    row 1 loses w=1.
    """
    score = W.abs().float() * torch.sqrt(input_sq_norms(H).float().clamp_min(0)).unsqueeze(0)
    mask = nm_mask(score, pattern) if pattern else row_balanced_mask(score, sparsity)
    return then_rtn(W, SolveResult(weight=W.masked_fill(mask, 0), mask=mask), quant, H)
