"""What every solver returns, and the one error measure they are compared by."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SolveResult:
    weight: Tensor  # new weights, (rows, cols), same dtype as the input
    mask: Tensor  # bool, True where the weight was pruned
    damp_frac: float = 0.0  # damping finally used (after retries); 0 for solvers without a Hessian inverse
    retries: int = 0  # Cholesky retries at higher damping

    @property
    def sparsity(self) -> float:
        return float(self.mask.float().mean())


def relative_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """||W X - Ŵ X||² / ||W X||², from H ∝ X Xᵀ alone (the scale of H cancels)."""
    W = W.float()
    D = W - W_new.float()
    num = ((D @ H) * D).sum()
    den = ((W @ H) * W).sum()
    return float(num / den) if den > 0 else 0.0
