"""Optimal Brain Compression's exact greedy OBS (Frantar et al. 2022), row by row: the quality reference.

Each row is pruned one weight at a time: the weight p with the least loss w_p² / [H⁻¹]_pp goes, the rest of
the row absorbs it (w ← w − w_p / [H⁻¹]_pp · H⁻¹_{:,p}), and the row's own inverse Hessian is downdated
(H⁻¹ ← H⁻¹ − H⁻¹_{:,p} H⁻¹_{p,:} / [H⁻¹]_pp), so every later choice is exact given the earlier ones. Rows are
processed in batches, each with its own copy of H⁻¹: memory rows_batch × cols², work rows × cols³, which is
why it is allowed only up to a column limit (``--obc-max-cols``); ``admm`` is the solver for wide layers.

Counts: unstructured rows get ⌊s·numel⌋ in total, split as evenly as the exact count allows; N:M rows prune
M−N per group (a group that is full is no longer eligible). With a grid, the mask is kept and SparseGPT's
sweep quantizes the kept weights, as for ``admm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.pattern import Pattern
from llmprune.quant import QuantSpec
from llmprune.solvers.hinv import dead_inputs, inverse_hessian_cholesky, prepare_weight
from llmprune.solvers.masks import split_counts
from llmprune.solvers.result import SolveResult
from llmprune.solvers.sparsegpt import SparseGPTOptions, sparsegpt

MAX_COLS = 1024  # rows × cols³ work: a 1024-wide layer of 1024 rows is ~5·10¹¹ flops
ROW_BATCH_BYTES = 256 << 20  # the rows' inverse-Hessian copies held at once


@dataclass(frozen=True)
class ObcOptions(SparseGPTOptions):
    """``obc``'s options: the sweep's (it quantizes on its mask with it), then its own."""

    max_cols: int = MAX_COLS  # wider layers are refused (rows x cols³ work)


def obc(
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
    max_cols: int = MAX_COLS,
) -> SolveResult:
    """Exact greedy OBS pruning of every row of ``W`` on ``H``; see the module docstring."""
    rows, cols = W.shape
    if cols > max_cols:
        raise ValueError(f"obc is limited to {max_cols} input columns (this layer has {cols}): use admm")
    dead = dead_inputs(H)
    W32 = prepare_weight(W, dead)
    U, damp_used, retries = inverse_hessian_cholesky(H, damp_frac)
    Hinv = U.t() @ U  # (H' + λI)⁻¹ from its upper factor
    del U
    if pattern is None:
        k = torch.tensor(split_counts([cols] * rows, sparsity), device=W.device)
    else:
        if cols % pattern.m:
            raise ValueError(f"{cols} input columns cannot hold {pattern}: not a multiple of {pattern.m}")
        k = torch.full((rows,), cols // pattern.m * (pattern.m - pattern.n), device=W.device)
    batch = max(1, min(rows, ROW_BATCH_BYTES // (4 * cols * cols)))
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for r1 in range(0, rows, batch):
        r2 = min(r1 + batch, rows)
        Wb, Mb, kb = W32[r1:r2], mask[r1:r2], k[r1:r2]
        Hb = Hinv.expand(r2 - r1, cols, cols).clone()  # (b, cols, cols): one inverse Hessian per row
        idx = torch.arange(r2 - r1, device=W.device)
        for step in range(int(kb.max()) if kb.numel() else 0):
            active = kb > step
            d = torch.diagonal(Hb, dim1=1, dim2=2)  # (b, cols)
            score = Wb.square() / d
            score.masked_fill_(Mb, float("inf"))
            if pattern is not None:  # a group holding M−N pruned weights is full
                full = Mb.view(-1, cols // pattern.m, pattern.m).sum(-1) >= pattern.m - pattern.n
                score.masked_fill_(full.repeat_interleave(pattern.m, 1), float("inf"))
            p = score.argmin(1)  # (b,)
            hp = Hb[idx, :, p]  # (b, cols): column p of each row's H⁻¹
            dp = d[idx, p].clamp_min(1e-30)
            f = torch.where(active, Wb[idx, p] / dp, torch.zeros_like(dp))
            Wb.sub_(f.unsqueeze(1) * hp)
            g = torch.where(active, 1 / dp, torch.zeros_like(dp))
            Hb.sub_((hp * g.unsqueeze(1)).unsqueeze(2) * hp.unsqueeze(1))  # rank-1 downdate, active rows only
            Mb[idx[active], p[active]] = True
            Wb[Mb] = 0
            Hb[idx[active], p[active], p[active]] = 1  # keep the pivot's diagonal finite (it is never chosen again)
    if quant is not None:
        return sparsegpt(W, H, sparsity, None, quant, block_size=block_size, damp_frac=damp_frac,
                         act_order=act_order, kernels=kernels, mask=mask)
    return SolveResult(weight=W32.masked_fill(mask, 0).to(W.dtype), mask=mask, damp_frac=damp_used,
                       retries=retries)
