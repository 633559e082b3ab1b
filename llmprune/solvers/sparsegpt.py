"""SparseGPT (Frantar & Alistarh 2023), Algorithm 1: prune columns left to right, fixing the error of each
pruned weight with the inverse-Hessian row, in blocks of ``block_size`` columns with a lazy trailing update.

Names follow the paper and the reference code: W1/Q1/Err1/Hinv1 are the current block, i1:i2 its columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.recipe import Pattern
from llmprune.solvers.hinv import inverse_hessian_cholesky, prepare_hessian
from llmprune.solvers.masks import nm_mask, smallest_k_mask, split_counts
from llmprune.solvers.result import SolveResult


def sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    pattern: Pattern | None = None,
    *,
    block_size: int = 128,
    damp_frac: float = 0.01,
) -> SolveResult:
    """Prune ``W`` (rows, cols) given the Hessian ``H`` (cols, cols) = 2/n Σ x xᵀ of its inputs.

    Unstructured: each block's mask is the lowest w²/[H⁻¹]_ii² over the whole block, with counts split so the
    layer has exactly floor(sparsity · numel) zeros. N:M: at every M-th column, per row, the M−N lowest of
    the *updated* weights in the next M columns. With H = I the update is zero and this is magnitude
    pruning within each block.
    """
    dtype = W.dtype
    W, H = prepare_hessian(W, H)
    rows, cols = W.shape
    if pattern is not None and cols % pattern.m:
        raise ValueError(f"{cols} input columns cannot hold {pattern}: not a multiple of {pattern.m}")
    Hinv, damp_used, retries = inverse_hessian_cholesky(H, damp_frac)

    starts = list(range(0, cols, block_size))
    counts = split_counts([rows * (min(i1 + block_size, cols) - i1) for i1 in starts], sparsity)
    M = torch.zeros_like(W, dtype=torch.bool)

    for i1, k in zip(starts, counts, strict=True):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        # The block is held transposed, (count, rows), so column i is the contiguous row W1[i].
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if pattern is None:
            mask1 = smallest_k_mask(W1**2 / d1.unsqueeze(1) ** 2, k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        # err = (w - q) / d with q = w masked to 0, i.e. w * mask / d: one multiply per column
        scale1 = mask1 / d1.unsqueeze(1)

        for i in range(count):
            if pattern is not None and i % pattern.m == 0:
                j = i + pattern.m
                tmp = W1[i:j] ** 2 / d1[i:j].unsqueeze(1) ** 2  # (m, rows)
                mask1[i:j] = nm_mask(tmp.t(), pattern).t()
                scale1[i:j] = mask1[i:j] / d1[i:j].unsqueeze(1)
            torch.mul(W1[i], scale1[i], out=Err1[i])
            # rank-1 update of the rest of the block; W1[i] itself becomes q (0 where pruned, w elsewhere)
            W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1)

        W1.masked_fill_(mask1, 0)  # exact zeros: w - (w / d) * d may leave a rounding residue
        W[:, i1:i2] = W1.t()
        M[:, i1:i2] = mask1.t()
        W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]

    return SolveResult(weight=W.to(dtype), mask=M, damp_frac=damp_used, retries=retries)
