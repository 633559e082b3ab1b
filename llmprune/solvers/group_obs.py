"""Structured pruning of one consuming linear: which groups of input columns to remove, and the rest's update.

A group is a set of input columns of the linear that reads them: one MLP channel of down_proj (fc2), or one
attention head's ``head_dim`` columns of o_proj. Removing group S from W (rows, cols) with input Hessian H
costs, by OBS (ZipLM, SlimGPT), tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ), and the remaining columns absorb it with
W ← W − W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:, after which H⁻¹ is downdated the same way. Greedy: the cheapest group
goes, costs are recomputed on the updated W and H⁻¹, and so on; many channels go in one step (the cheapest
``chunk`` at once, removed as one group), heads one at a time. ``l1`` (the norms of the weights that produce
each group, as L1-norm filter pruning) and ``wanda`` (‖W_S‖ · ‖X_S‖) only choose, and update nothing.

Example: H = I and one row: the cost of a channel is w_j², so the smallest |w_j| goes, and nothing moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from llmprune.solvers.hinv import dead_inputs, inverse_hessian_cholesky, prepare_weight

METHODS = ("obs", "l1", "wanda")


def _inverse(H: Tensor, damp_frac: float) -> Tensor:
    U, _, _ = inverse_hessian_cholesky(H, damp_frac)
    return U.t() @ U  # (H' + λI)⁻¹


def obs_remove(
    W: Tensor, H: Tensor, groups: Tensor, n_remove: int, *, damp_frac: float = 0.01, chunk: int = 1,
    allowed: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Remove ``n_remove`` of the column ``groups`` ((n_groups, g) column indices) of ``W`` by greedy OBS.

    ``chunk``: groups removed per step (one downdate per step). ``allowed(removed) -> bool (n_groups,)``:
    which groups may still go (e.g. the same number of query heads from every KV group). Returns (removed
    group indices, sorted; W with every column updated, the removed ones zero), W in fp32.
    """
    W = prepare_weight(W, dead_inputs(H))
    Hinv = _inverse(H, damp_frac)
    n_groups, g = groups.shape
    removed = torch.zeros(n_groups, dtype=torch.bool, device=W.device)
    while int(removed.sum()) < n_remove:
        blocks = Hinv[groups.unsqueeze(2), groups.unsqueeze(1)]  # (n_groups, g, g)
        Wg = W[:, groups]  # (rows, n_groups, g)
        inv = torch.linalg.inv(blocks) if g > 1 else 1 / blocks
        cost = torch.einsum("rng,ngh,rnh->n", Wg, inv, Wg)
        ok = ~removed if allowed is None else ~removed & allowed(removed)
        cost = cost.masked_fill(~ok, float("inf"))
        k = min(chunk, n_remove - int(removed.sum()), int(ok.sum()))
        if k <= 0:
            raise ValueError("no group may be removed any more: the constraint leaves none")
        pick = torch.topk(cost, k, largest=False).indices
        S = groups[pick].reshape(-1)  # the columns going now
        HS = Hinv[S][:, S]
        solve = torch.linalg.solve(HS, Hinv[S])  # [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:  (|S|, cols)
        W -= W[:, S] @ solve
        Hinv -= Hinv[:, S] @ solve
        removed[pick] = True
        W[:, groups[removed].reshape(-1)] = 0  # exactly: rounding leaves residues in earlier removed columns
        Hinv[S, S] = 1  # keep the removed columns' diagonal finite; they are never chosen again
    return removed.nonzero().squeeze(1), W


def score_remove(
    W_out: Tensor, H: Tensor | None, producers: list[Tensor], groups: Tensor, n_remove: int, method: str,
    allowed: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """l1 or wanda: the ``n_remove`` groups of lowest score (no update), respecting ``allowed``.

    l1: the L1 norm of the rows that produce each group (gate/up rows of a channel, q rows of a head);
    wanda: Σ over the group's columns of ‖W_out[:, j]‖₁ · ‖X_j‖ on the consuming linear."""
    if method == "l1":
        score = sum(P.float().abs().sum(1)[groups].sum(1) for P in producers)
    elif method == "wanda":
        norm = torch.sqrt(torch.diag(H).float().clamp_min(0))
        score = (W_out.float().abs().sum(0) * norm)[groups].sum(1)
    else:
        raise ValueError(f"unknown structured method {method!r}: choose {', '.join(METHODS)}")
    removed = torch.zeros(groups.shape[0], dtype=torch.bool, device=groups.device)
    for _ in range(n_remove):  # one at a time so that ``allowed`` can follow the removals
        ok = ~removed if allowed is None else ~removed & allowed(removed)
        removed[score.masked_fill(~ok, float("inf")).argmin()] = True
    return removed.nonzero().squeeze(1)


def channel_chunk(n_remove: int, steps: int = 32) -> int:
    """Channels removed per OBS step: the removal in about ``steps`` downdates."""
    return max(1, math.ceil(n_remove / steps))
