"""What every solver returns, and the one error measure they are compared by."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.quant import QuantParams


@dataclass
class SolveResult:
    weight: Tensor  # new weights, (rows, cols), same dtype as the input
    mask: Tensor  # bool, True where the weight was pruned
    damp_frac: float = 0.0  # damping finally used (after retries); 0 for solvers without a Hessian inverse
    retries: int = 0  # Cholesky retries at higher damping
    quant: QuantParams | None = None  # the grids the weights lie on, when quantized
    # share of the output error ||WX - ŴX||² due to rounding the kept weights (the rest is pruning's), from
    # the losses of each step; None when not quantized or without a Hessian
    quant_share: float | None = None
    iterations: int | None = None  # iterative solvers (admm, refit): iterations run
    # admm: the output error of its SparseGPT warm start, tr((W - Ŵ₀) H (W - Ŵ₀)ᵀ), to compare against
    warm_error: float | None = None
    # sparsegpt: the sum of its steps' OBS losses err², which is tr((W - Ŵ)(H + λI)(W - Ŵ)ᵀ) of the damped H it
    # solved with (the sweep's own exact account of its output error, at no cost)
    obs_loss: float | None = None

    @property
    def sparsity(self) -> float:
        return float(self.mask.float().mean())


def output_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ), i.e. ||W X - Ŵ X||² up to H's scale."""
    D = W.float() - W_new.float()
    return float(((D @ H) * D).sum())


def relative_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """||W X - Ŵ X||² / ||W X||², from H ∝ X Xᵀ alone (the scale of H cancels)."""
    den = output_error(W, W.new_zeros(()), H)
    return output_error(W, W_new, H) / den if den > 0 else 0.0


def input_sq_norms(H: Tensor) -> Tensor:
    """diag(H) = 2/n Σ x_j², from a Hessian or from the diagonal alone (what Wanda and OWL collect)."""
    return H if H.dim() == 1 else torch.diagonal(H)
