"""Refit: the best weights for a fixed mask, min ‖(Ŵ − W) X‖² with Ŵ zero where pruned, row by row.

For row r with kept set S the optimum solves H_SS ŵ_S = (W_r H)_S, a positive definite system per row. All rows
are solved at once by preconditioned conjugate gradients on the masked operator v ↦ keep ⊙ (v H), one GEMM
per iteration, with the Jacobi preconditioner diag(H) (no per-row inverse is ever formed). A refit is only
kept where it lowers the layer's error, so it never makes a mask's weights worse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.solvers.result import SolveResult


def damped(H: Tensor, damp_frac: float) -> Tensor:
    """H + λI with λ = damp_frac · mean(diag H), dead inputs' H_ii taken as 1 (as the Cholesky path does)."""
    Hd = H.float().clone()
    diag = Hd.diagonal()
    diag[diag == 0] = 1
    diag.add_(damp_frac * diag.mean())
    return Hd


def pcg(W: Tensor, Hd: Tensor, keep: Tensor, X0: Tensor, iters: int, tol: float = 1e-6) -> tuple[Tensor, int]:
    """Minimise tr((X − W) Hd (X − W)ᵀ) over X with X = 0 off ``keep``, from ``X0``; all rows together.

    Returns (X, iterations run). Stops early when every row's residual is below ``tol`` × its initial one.
    """
    keep = keep.float()
    X = X0.float() * keep
    B = (W.float() @ Hd) * keep  # (rows, cols): the right-hand sides, restricted to each row's support
    R = B - (X @ Hd) * keep
    Minv = keep / Hd.diagonal().unsqueeze(0)  # Jacobi: 1 / H_ii on the support
    Zr = R * Minv
    P = Zr.clone()
    rz = (R * Zr).sum(1, keepdim=True)
    r0 = R.norm(dim=1, keepdim=True).clamp_min(1e-30)
    done = 0
    for done in range(1, iters + 1):  # noqa: B007 (done is the count run, read after the loop)
        AP = (P @ Hd) * keep
        alpha = rz / (P * AP).sum(1, keepdim=True).clamp_min(1e-30)
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1)
        if bool((R.norm(dim=1, keepdim=True) <= tol * r0).all()):
            break
        Zr = R * Minv
        rz_new = (R * Zr).sum(1, keepdim=True)
        P.mul_(rz_new / rz.clamp_min(1e-30)).add_(Zr)
        rz = rz_new
    return X * keep, done


def refit(W: Tensor, H: Tensor, mask: Tensor, start: Tensor | None = None, *, iters: int = 50,
          damp_frac: float = 0.01) -> tuple[Tensor, int]:
    """The kept weights of ``mask`` (True = pruned) re-solved on ``H``; returns (Ŵ in W's dtype, iterations).

    ``start``: the weights to improve (default: W masked). Rows whose refit error is not lower than the
    start's keep the start (so the layer's error never rises).
    """
    X0 = (start if start is not None else W.masked_fill(mask, 0)).float()
    X, its = pcg(W, damped(H, damp_frac), ~mask, X0, iters)
    Hf = H.float()
    D0, D1 = W.float() - X0, W.float() - X
    e0, e1 = ((D0 @ Hf) * D0).sum(1), ((D1 @ Hf) * D1).sum(1)  # per-row errors before and after
    X = torch.where((e1 < e0).unsqueeze(1), X, X0)
    return X.masked_fill(mask, 0).to(W.dtype), its


def refit_result(W: Tensor, H: Tensor, res: SolveResult, iters: int = 50, damp_frac: float = 0.01) -> SolveResult:
    """``res`` with its kept weights refitted (unquantized results only: a grid's codes are not re-solved)."""
    if res.quant is not None:
        raise ValueError("refit re-solves real-valued weights; quantized results keep their codes")
    weight, its = refit(W, H, res.mask, res.weight, iters=iters, damp_frac=damp_frac)
    return SolveResult(weight=weight, mask=res.mask, damp_frac=res.damp_frac, retries=res.retries, quant=None,
                       quant_share=None, iterations=(res.iterations or 0) + its)
