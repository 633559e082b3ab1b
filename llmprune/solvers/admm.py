"""ADMM mask-and-weight search (after ALPS, Meng et al. 2024): min ‖(Ŵ − W) X‖² subject to the sparsity set.

Split Ŵ = Z with Z in the set (exactly ⌊s·numel⌋ zeros per layer, or N:M per group) and run scaled ADMM
under a rising penalty ρ:

    Ŵ ← (W H + ρ (Z − U)) (H + ρ I)⁻¹      least squares pulled toward the sparse copy
    Z ← Π(Ŵ + U)                            keep the largest entries the set allows
    U ← U + Ŵ − Z                           the scaled dual

H is eigendecomposed once (H = Q Λ Qᵀ), so every ρ costs two GEMMs: Ŵ = ((W H + ρ(Z − U)) Q / (Λ + ρ)) Qᵀ.
Warm start: SparseGPT's mask and weights. Once the support has stopped changing (or the iterations run out)
the kept weights are refitted on it exactly (refit.py's PCG). The result is the better of that and the warm
start, so ``admm`` is never worse than SparseGPT on the layer's own objective.

Example: with H = I the least-squares step is a plain average and Π keeps the largest |w|, so ADMM ends at
magnitude pruning with the kept weights unchanged, which is the optimum for H = I.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.pattern import Pattern
from llmprune.quant import QuantSpec
from llmprune.solvers.hinv import dead_inputs, prepare_weight, shared_factor
from llmprune.solvers.masks import magnitude_mask
from llmprune.solvers.refit import damped, refit
from llmprune.solvers.result import SolveResult, output_error
from llmprune.solvers.sparsegpt import sparsegpt

# Defaults: first a grid on correlated random layers (50%, 70%, 2:4; both aspect ratios) gave ρ0 0.3, × 1.6,
# stop after 3 unchanged supports (at most 60 iterations), refit 10 PCG steps (20 or 40 gave the same error):
# a low first penalty lets the iterates leave SparseGPT's good support for the dense optimum's. Then SmolLM2-135M
# at 70% (32 x 512 calibration, held-out perplexity, one run each on this 2-core CPU; SparseGPT 97.10 in 48.9 s):
# ρ0/growth 0.3/1.6 -> 80.55 in 114.6 s, 0.1/1.6 -> 74.25 in 123.9 s, 0.15/1.45 -> 74.17 in 130.6 s,
# 0.1/1.3 -> 72.91 in 154.9 s, 0.1/1.9 -> 76.23 in 114.5 s: lower first penalties are better still on real
# layers, a faster rise pays for them. 0.1/1.9 is the default (scripts/bench_admm.py for 50% and 2:4).
ITERS = 60
RHO0 = 0.1
RHO_GROWTH = 1.9
PATIENCE = 3
REFIT_ITERS = 10


def admm(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    pattern: Pattern | None = None,
    quant: QuantSpec | None = None,
    *,
    block_size: int = 128,
    damp_frac: float = 0.01,
    act_order: bool = False,
    kernels: str = "auto",
    iters: int = ITERS,
    rho0: float = RHO0,
    rho_growth: float = RHO_GROWTH,
    refit_iters: int = REFIT_ITERS,
) -> SolveResult:
    """Prune ``W`` (rows, cols) on ``H`` (cols, cols) by ADMM from SparseGPT's result; with ``quant``, the mask
    found is then kept fixed while SparseGPT's sweep quantizes the kept weights (joint, as for sparsegpt)."""
    warm = sparsegpt(W, H, sparsity, pattern, None, block_size=block_size, damp_frac=damp_frac, kernels=kernels)
    dead = dead_inputs(H)
    W32 = prepare_weight(W, dead)

    def factor() -> tuple[Tensor, Tensor, Tensor]:
        Hd = damped(H, warm.damp_frac)
        Hn = Hd / Hd.diagonal().mean()  # ρ is relative to the mean diagonal
        lam, Q = torch.linalg.eigh(Hn)  # Hn = Q diag(lam) Qᵀ
        return Hn, lam, Q

    Hn, lam, Q = shared_factor("admm", H, (warm.damp_frac,), factor)  # q/k/v, gate/up: one eigh for the group
    WH = W32 @ Hn

    def project(V: Tensor) -> Tensor:
        return ~magnitude_mask(V, sparsity, pattern)

    Z = warm.weight.float()
    keep = ~warm.mask
    U = torch.zeros_like(Z)
    rho, still, its = rho0, 0, 0
    for its in range(1, iters + 1):  # noqa: B007 (its is the count run, read after the loop)
        Wt = ((WH + rho * (Z - U)) @ Q).div_(lam + rho) @ Q.t()  # (H + ρI)⁻¹ in the eigenbasis
        V = Wt + U
        new_keep = project(V)
        changed = int((new_keep != keep).sum())
        keep = new_keep
        Z = V * keep
        U = V - Z  # U + Ŵ − Z
        still = still + 1 if changed == 0 else 0
        if still >= PATIENCE:
            break
        rho *= rho_growth
    mask = ~keep
    fitted, refit_its = refit(W32, H, mask, Z, iters=refit_iters, damp_frac=warm.damp_frac)
    warm_err = output_error(W32, warm.weight, H)
    if output_error(W32, fitted, H) >= warm_err:  # the search did not pay: SparseGPT's answer stands
        fitted, mask = warm.weight.float(), warm.mask
    if quant is not None:
        res = sparsegpt(W, H, sparsity, None, quant, block_size=block_size, damp_frac=damp_frac,
                        act_order=act_order, kernels=kernels, mask=mask)
        res.iterations, res.warm_error = its + refit_its, warm_err
        return res
    return SolveResult(weight=fitted.to(W.dtype), mask=mask, damp_frac=warm.damp_frac, retries=warm.retries,
                       iterations=its + refit_its, warm_error=warm_err)
