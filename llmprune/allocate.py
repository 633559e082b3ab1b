"""Per-layer sparsity under one global target: uniform, OWL (outlier-weighted), or a SPDY-style dynamic program.

Every allocation returns {linear full name: sparsity} whose parameter-weighted mean is the target (OWL
exactly up to each layer's floor; dp to within 0.1%).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmprune.solvers.result import input_sq_norms


def outlier_ratio(pairs: list[tuple[Tensor, Tensor]], m: float) -> float:
    """OWL's layerwise outlier distribution of one block: the share of the Wanda scores |W|·‖X‖ of all its
    linears (weights W, Hessians H or their diagonals) above ``m`` times their mean."""
    scores = [
        (W.abs().float() * torch.sqrt(input_sq_norms(H).float().clamp_min(0)).unsqueeze(0)).reshape(-1)
        for W, H in pairs
    ]
    score = torch.cat(scores)
    return float((score > m * score.mean()).float().mean())


def owl(block_ratios: list[float], block_sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities in [target - lam, target + lam], lower where the outlier ratio is higher, with the
    parameter-weighted mean equal to ``target`` (Yin et al. 2024, OWL).

    Example: ratios [0.01, 0.03, 0.02], equal sizes, target 0.7, lam 0.08 -> [0.78, 0.62, 0.70].
    """
    r = torch.tensor(block_ratios, dtype=torch.float64)
    n = torch.tensor(block_sizes, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0:
        return [target] * len(block_ratios)
    keep = (r - r.min()) / span * 2 * lam - lam  # extra density in [-lam, lam]: more outliers -> keep more
    keep = keep - (keep * n).sum() / n.sum()  # parameter-weighted mean 0, so the mean sparsity is the target
    if float(keep.abs().max()) > lam:  # the shift pushed a block past ±lam: shrink (mean and order stay)
        keep = keep * (lam / keep.abs().max())
    s = (target - keep).clamp(0.0, 0.99)
    return [float(x) for x in s]


def candidates(target: float, radius: float = 0.1, step: float = 0.025) -> list[float]:
    """target ± radius in steps of ``step``, inside [0, 0.99)."""
    k = round(radius / step)
    out = [round(target + i * step, 6) for i in range(-k, k + 1)]
    return [s for s in out if 0.0 <= s < 0.99]


def dp(tables: dict[str, dict], target: float, units: int = 200_000) -> dict[str, float]:
    """Pick one candidate sparsity per layer minimising the summed error with the pruned parameters equal to
    the target's (to 0.1% of the parameters).

    ``tables``: name -> {"numel": n, "errors": {sparsity: error}}. A knapsack over budget units: best[b] is
    the least error of the layers so far with exactly b units pruned; one vectorised shifted minimum per
    candidate per layer.
    """
    names = list(tables)
    total = sum(int(t["numel"]) for t in tables.values())
    unit = total / units
    goal = round(target * total / unit)
    inf = math.inf
    best = torch.full((units + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = []  # per layer: (units+1,) index of the candidate chosen to reach each budget
    for name in names:
        t = tables[name]
        cands = sorted((float(s), float(e)) for s, e in t["errors"].items())
        nxt = torch.full_like(best, inf)
        arg = torch.full((units + 1,), -1, dtype=torch.int8)
        for j, (s, err) in enumerate(cands):
            w = round(s * int(t["numel"]) / unit)
            shifted = torch.full_like(best, inf)
            if w <= units:
                shifted[w:] = best[: units + 1 - w] + err
            better = shifted < nxt
            nxt = torch.where(better, shifted, nxt)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        best = nxt
        choice.append((cands, arg))
    # per-layer budgets are rounded to whole units, so an exact combination may land a few units off the goal:
    # take the best within ±tol units (0.05% of the parameters; with the rounding, within 0.1% in all)
    tol = units // 2000
    lo, hi = max(goal - tol, 0), min(goal + tol, units)
    window = best[lo : hi + 1]
    if not math.isfinite(float(window.min())):
        raise ValueError(f"no combination of the candidate sparsities reaches the target {target}")
    out, b = {}, lo + int(torch.argmin(window))
    for name, (cands, arg) in zip(reversed(names), reversed(choice), strict=True):
        j = int(arg[b])
        s = cands[j][0]
        out[name] = s
        b -= round(s * int(tables[name]["numel"]) / unit)
    return {n: out[n] for n in names}
