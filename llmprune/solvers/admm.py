"""ADMM mask-and-weight search (after ALPS, Meng et al. 2024): min ‖(Ŵ − W) X‖² subject to the sparsity set.

The problem is first normalized by the input norms x_j = √(H + λI)_jj, as ALPS does: B = W·x, Hn = H / x_i x_j
(unit diagonal), so the projection keeps the largest |b| = |w|·‖x‖ (Wanda's importance, not the raw |w|) and
one ρ suits every layer. Split B = Z with Z in the set (exactly ⌊s·numel⌋ zeros per layer, or N:M per group)
and run scaled ADMM under a rising penalty ρ:

    B ← (B₀ Hn + ρ (Z − U)) (Hn + ρ I)⁻¹    least squares pulled toward the sparse copy
    Z ← Π(B + U)                            keep the largest entries the set allows
    U ← U + B − Z                           the dual (not rescaled when ρ changes: it keeps pulling)

Hn is eigendecomposed once (Hn = Q Λ Qᵀ) and (Hn + ρI)⁻¹ = Q (Λ + ρ)⁻¹ Qᵀ formed when ρ changes, every
CHECK_EVERY iterations, so an iteration costs one GEMM. ρ's schedule is ALPS': it grows by RHO_GROWTH while
much of the support still moves, by smaller steps as it settles, and the search stops once it has settled.
Warm start: SparseGPT's mask and weights (in the normalized problem; ALPS starts from the largest |b|, which
measured worse). Then the kept weights are refitted on the support found (refit.py's PCG, whose Jacobi
preconditioner is exactly this normalization). The result is the better of that and the warm start, so
``admm`` is never worse than SparseGPT on the layer's own objective.

Example: with H = I the least-squares step is a plain average and Π keeps the largest |w|, so the support never
moves and ADMM ends at magnitude pruning with the kept weights unchanged, which is the optimum for H = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.pattern import Pattern
from llmprune.quant import QuantSpec
from llmprune.solvers.hinv import dead_inputs, prepare_weight, shared_factor
from llmprune.solvers.masks import magnitude_mask
from llmprune.solvers.refit import damped, refit
from llmprune.solvers.result import SolveResult, output_error
from llmprune.solvers.sparsegpt import SparseGPTOptions, sparsegpt

# Defaults chosen one change at a time against the ALPS authors' code (docs/admm.md has the measurements).
# Every CHECK_EVERY iterations ρ grows by RHO_GROWTH while over 10% of the support moved, by 2/3 of that step
# while over 0.5% did, by 1/3 below that; the search stops once nothing moved, or after SETTLE_AFTER
# iterations once under SETTLED of it did, or at ITERS.
ITERS = 300
RHO0 = 0.05
RHO_GROWTH = 1.3
REFIT_ITERS = 10
CHECK_EVERY = 3
SETTLE_AFTER = 30
SETTLED = 3e-4
RHO_MAX = 1e6


@dataclass(frozen=True)
class AdmmOptions(SparseGPTOptions):
    """``admm``'s options: its SparseGPT warm start's (the sweep's), then its own."""

    iters: int = ITERS  # at most this many iterations
    rho0: float = RHO0  # the first penalty, in the problem scaled to a unit Hessian diagonal
    rho_growth: float = RHO_GROWTH  # x this every CHECK_EVERY iterations while much of the support moves
    refit_iters: int = REFIT_ITERS  # PCG steps of the refit on the support found


def rho_step(moved: float, grown: bool, rho_growth: float) -> float | None:
    """The penalty's factor after a check, from the share of the support that ``moved`` since the last one;
    0 while ρ has not grown yet means ρ0 was too large (back off 5x and start again); None: stop."""
    if moved > 0.1:
        return rho_growth
    if moved > 0.005:
        return 1 + (rho_growth - 1) * 2 / 3
    if moved == 0:
        return None
    return 1 + (rho_growth - 1) / 3 if grown else 0.0


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

    def factor() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        Hd = damped(H, warm.damp_frac)
        xn = Hd.diagonal().sqrt()  # ‖x_j‖ (damped)
        Hn = Hd.div_(xn.unsqueeze(0)).div_(xn.unsqueeze(1))  # unit diagonal
        lam, Q = torch.linalg.eigh(Hn)  # Hn = Q diag(lam) Qᵀ
        return xn, Hn, lam, Q

    xn, Hn, lam, Q = shared_factor("admm", H, (warm.damp_frac,), factor)  # q/k/v, gate/up: one eigh for the group

    def inverse(rho: float) -> Tensor:
        return (Q / (lam + rho)) @ Q.t()  # (Hn + ρI)⁻¹, once per ρ

    def project(V: Tensor) -> Tensor:
        return ~magnitude_mask(V, sparsity, pattern)  # the largest |b| = |w|·‖x‖

    B0 = W32 * xn  # the weights of the normalized problem
    G = B0 @ Hn
    Z0, keep0 = warm.weight.float() * xn, ~warm.mask
    kept = max(int(keep0.sum()), 1)
    Z, keep, U = Z0, keep0, torch.zeros_like(Z0)
    rho, grown, its = rho0, False, 0
    seen, A = keep, inverse(rho)
    for its in range(1, iters + 1):  # noqa: B007 (its is the count run, read after the loop)
        V = ((G + rho * (Z - U)) @ A).add_(U)  # Ŵ + U, Ŵ the least squares pulled toward Z − U
        keep = project(V)
        Z = V * keep
        U = V - Z  # U + Ŵ − Z
        if its % CHECK_EVERY:
            continue
        moved = int((keep != seen).sum()) / kept
        seen = keep
        step = rho_step(moved, grown, rho_growth)
        if step is None or (its > SETTLE_AFTER and moved < SETTLED):
            break
        if step == 0.0:  # no growth yet and the support hardly moves: ρ0 was too large
            rho /= 5
            Z, U = Z0, torch.zeros_like(Z0)
        else:
            grown = grown or moved > 0.005
            rho = min(rho * step, RHO_MAX)
        A = inverse(rho)
    mask = ~keep
    fitted, refit_its = refit(W32, H, mask, Z / xn, iters=refit_iters, damp_frac=warm.damp_frac)
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
