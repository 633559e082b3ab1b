"""Exact mask selection shared by every solver: who gets pruned, given a score (lower = pruned first)."""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.pattern import Pattern, n_pruned

_SAMPLE = 8192


def kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The k-th smallest value (1-based) of a 1-D float tensor, as a 0-d tensor; the same as ``kthvalue``.

    On large tensors a fixed random sample brackets the answer (±4 standard deviations of its rank) and only
    the entries in that band are searched: several times faster than ``kthvalue`` over all of them, which
    matters to solvers that re-select a mask every iteration (admm). Falls back to the full search when the
    band misses.
    """
    n = flat.numel()
    if n > 8 * _SAMPLE:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(n, (_SAMPLE,), generator=gen).to(flat.device)
        sample = flat[idx]
        q = k / n
        margin = int(4 * (q * (1 - q) * _SAMPLE) ** 0.5) + 8
        at = int(q * _SAMPLE)
        # the sample's order statistics at ±margin (two selections: a full sort of it costs ten times more)
        lo = sample.kthvalue(max(at - margin, 0) + 1).values
        hi = sample.kthvalue(min(at + margin, _SAMPLE - 1) + 1).values
        below = int((flat < lo).sum())
        band = (flat >= lo) & (flat <= hi)
        if below < k <= below + int(band.sum()):
            return flat[band].kthvalue(k - below).values
    return flat.kthvalue(k).values


def smallest_k_mask(score: Tensor, k: int) -> Tensor:
    """Bool mask (True = pruned) of exactly ``k`` entries with the smallest score; ties broken by position.

    kthvalue + a tie fix instead of topk: topk(k) on a 600M-entry matrix would allocate k indices and values.
    """
    flat = score.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask.view_as(score)
    if k >= flat.numel():
        return torch.ones_like(mask).view_as(score)
    thr = kth_smallest(flat.float(), k).to(flat.dtype)
    mask = flat < thr
    need = k - int(mask.sum())
    if need > 0:
        ties = (flat == thr).nonzero().squeeze(1)[:need]
        mask[ties] = True
    return mask.view_as(score)


def nm_mask(score: Tensor, pattern: Pattern) -> Tensor:
    """Per row, in every group of ``m`` consecutive columns, prune the ``m - n`` lowest scores.

    Example, 2:4 on one row ``[0.1, 5, 3, 0.2]`` -> pruned ``[True, False, False, True]``.
    """
    rows, cols = score.shape
    if cols % pattern.m:
        raise ValueError(f"{cols} columns cannot hold {pattern} groups: not a multiple of {pattern.m}")
    groups = score.reshape(rows, cols // pattern.m, pattern.m)  # (rows, groups, m)
    idx = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def magnitude_mask(W: Tensor, sparsity: float, pattern: Pattern | None = None) -> Tensor:
    """The smallest |w| over the whole matrix (exactly floor(s * numel)), or within each N:M group."""
    score = W.abs().float()
    return nm_mask(score, pattern) if pattern else smallest_k_mask(score, n_pruned(sparsity, W.numel()))


def split_counts(sizes: list[int], sparsity: float) -> list[int]:
    """How many to prune in each chunk so the chunks add up to exactly floor(sparsity * total).

    Chunk j gets floor(s * (n_0 + ... + n_j)) - floor(s * (n_0 + ... + n_{j-1})): each chunk is within one
    weight of its own share and the total is exact (per-chunk floors alone would undercount).
    """
    out, seen, prev = [], 0, 0
    for size in sizes:
        seen += size
        cum = n_pruned(sparsity, seen)
        out.append(cum - prev)
        prev = cum
    return out


def row_balanced_mask(score: Tensor, sparsity: float) -> Tensor:
    """Prune the lowest scores within each row (Wanda's comparison group), exactly floor(s * numel) in all.

    Every row loses floor(k / rows); the remaining k mod rows go to the rows whose next candidate scores
    lowest, so the total matches the unstructured count exactly.
    """
    rows, cols = score.shape
    k = n_pruned(sparsity, score.numel())
    per_row, extra = divmod(k, rows)
    order = torch.argsort(score, dim=1, stable=True)  # (rows, cols), ascending
    mask = torch.zeros_like(score, dtype=torch.bool)
    if per_row:
        mask.scatter_(1, order[:, :per_row], True)
    if extra:
        nxt = order[:, per_row]  # each row's next candidate
        nxt_score = score.gather(1, nxt.unsqueeze(1)).squeeze(1)
        chosen = smallest_k_mask(nxt_score, extra).nonzero().squeeze(1)
        mask[chosen, nxt[chosen]] = True
    return mask


def violations(W: Tensor, pattern: Pattern) -> Tensor:
    """Bool (rows, cols/m): groups of ``m`` consecutive columns holding more than ``n`` nonzeros."""
    rows, cols = W.shape
    return (W.reshape(rows, cols // pattern.m, pattern.m) != 0).sum(-1) > pattern.n


def holds(W: Tensor, pattern: Pattern) -> bool:
    """Whether every row of ``W`` has at most ``n`` nonzeros in each group of ``m`` consecutive columns."""
    return W.shape[1] % pattern.m == 0 and not bool(violations(W, pattern).any())
