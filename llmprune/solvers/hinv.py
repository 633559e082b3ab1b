"""The upper Cholesky factor of the damped inverse Hessian, with retries at higher damping."""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.errors import CholeskyError


def prepare_hessian(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 copies with dead inputs (never active in calibration) zeroed in W and given H_ii = 1."""
    W = W.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def inverse_hessian_cholesky(H: Tensor, damp_frac: float, retries: int = 3) -> tuple[Tensor, float, int]:
    """Upper U with Uᵀ U = (H + λI)⁻¹, λ = damp_frac · mean(diag H); on failure retry with 10× the damping.

    Returns (U, damp_frac used, retries needed). Never falls back to an identity Hessian: that would be
    magnitude pruning wearing SparseGPT's name.
    """
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    frac = damp_frac
    for attempt in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H + frac * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, frac, attempt
        frac *= 10
    raise CholeskyError(
        f"Hessian is not positive definite even at damp_frac={frac / 10:g}: pass more calibration samples"
        " (--nsamples) or a larger --damp"
    )
