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
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if pattern is None:
            mask1 = smallest_k_mask(W1**2 / d1.unsqueeze(0) ** 2, k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pattern is not None and i % pattern.m == 0:
                tmp = W1[:, i : i + pattern.m] ** 2 / d1[i : i + pattern.m].unsqueeze(0) ** 2
                mask1[:, i : i + pattern.m] = nm_mask(tmp, pattern)
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        M[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return SolveResult(weight=W.to(dtype), mask=M, damp_frac=damp_used, retries=retries)
