"""Per-layer sparsity under one global target: uniform, OWL (outlier-weighted), or a SPDY-style dynamic program.

Every allocation returns {linear full name: sparsity} whose parameter-weighted mean is the target (OWL
exactly up to each layer's floor; spdy's dynamic program to within 0.1%).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.solvers.result import input_sq_norms


@dataclass(frozen=True)
class AllocationSpec:
    """A non-uniform allocation of the target sparsity, or of bit-widths, over the linears (planned by
    plan.plan_sparsities)."""

    method: str  # owl (per block, from outlier ratios) or spdy (per layer, searched on the calibration loss)
    # the global sparsity the allocation keeps; with ``bits``, the average bits per weight it stays under
    target: float
    # spdy over bit-widths: each linear quantized to one of these (integer grids, the run's group size), the
    # sparsity uniform; empty: spdy over sparsities
    bits: tuple[int, ...] = ()
    owl_m: float = 5.0  # a Wanda score above owl_m x its block's mean counts as an outlier
    owl_lambda: float | str = 0.08  # block sparsities lie in target ± owl_lambda; "auto": chosen by trials
    owl_samples: int = 8  # --owl-lambda auto: the windows each trial is scored on
    spdy_radius: float = 0.1  # the candidate sparsities: target ± spdy_radius in steps of 0.025
    spdy_steps: int = 24  # sensitivity candidates the search scores
    spdy_samples: int = 4  # the windows each candidate is scored on
    seed: int = 0  # of the search


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


def cost(table: dict, key: str) -> float:
    """The share of a layer's budget a candidate saves: its sparsity, or with ``costs`` (bit-widths, ``bit_costs``)
    the share of the widest candidate's bits it does not spend."""
    return float(table["costs"][key]) if "costs" in table else float(key)


def bit_key(bits: int) -> str:
    """A bit-width candidate's key in the error tables and the version store."""
    return f"w{bits}"


def bit_of(key: str) -> int:
    """``bit_key``'s inverse."""
    return int(key.removeprefix("w"))


def bit_costs(choices: tuple[int, ...]) -> dict[str, float]:
    """Each bit-width's saving against the widest: 1 - bits / max."""
    top = max(choices)
    return {bit_key(b): 1 - b / top for b in choices}


def dp(tables: dict[str, dict], target: float, units: int = 200_000,
       weights: dict[str, float] | None = None, at_least: bool = False) -> dict[str, float | str]:
    """Pick one candidate sparsity per layer minimising the summed (``weights``-scaled) error with the pruned
    parameters equal to the target's (to 0.1% of the parameters); ``at_least``: at least the target's, never
    fewer (bit-widths: the average never over the budget).

    ``tables``: name -> {"numel": n, "errors": {sparsity: error}}; with ``costs`` {key: saving} (bit-widths) the
    candidates are those keys and their savings count instead, and the keys are returned. A knapsack over
    budget units: best[b] is the least error of the layers so far with exactly b units pruned; one vectorised
    shifted minimum per candidate per layer. Only the band of budgets that the layers so far can reach and the
    layers left can still bring to the goal is kept (about a tenth of all budgets: spdy runs this once per
    candidate).
    ``weights``: each layer's sensitivity coefficient (SPDY's), 1 when absent.
    """
    names = list(tables)
    total = sum(int(t["numel"]) for t in tables.values())
    unit = total / units
    goal = round(target * total / unit)
    # per-layer budgets are rounded to whole units, so an exact combination may land a few units off the goal:
    # take the best within ±tol units (0.05% of the parameters; with the rounding, within 0.1% in all)
    tol = units // 2000
    inf = math.inf
    layers = []  # per layer: candidates sorted by sparsity as (sparsity, weighted error, units)
    to_units = math.floor if at_least else round  # at_least: units never overstate a saving
    for name in names:
        t, c = tables[name], (weights or {}).get(name, 1.0)
        keyed = "costs" in t
        layers.append([(s if keyed else float(s), c * float(e), to_units(cost(t, s) * int(t["numel"]) / unit))
                       for s, e in sorted(t["errors"].items(), key=lambda kv: cost(t, kv[0]))])
    # the band: budgets reachable by the layers so far and from which the layers left can reach the goal window
    w_min = [min(w for _, _, w in cands) for cands in layers]
    w_max = [max(w for _, _, w in cands) for cands in layers]
    rest_min, rest_max = [0] * (len(layers) + 1), [0] * (len(layers) + 1)  # summed over layers k.. the end
    for k in range(len(layers) - 1, -1, -1):
        rest_min[k], rest_max[k] = rest_min[k + 1] + w_min[k], rest_max[k + 1] + w_max[k]
    lo_goal, hi_goal = (goal, units) if at_least else (goal - tol, goal + tol)
    lo_goal, hi_goal = max(lo_goal, 0), min(hi_goal, units)
    lo, best = 0, torch.zeros(1, dtype=torch.float64)  # best[b - lo] for budgets b in the band
    choice = []  # per layer: (candidates, band start, index of the candidate chosen for each budget)
    for k, cands in enumerate(layers):
        new_lo = max(lo + w_min[k], lo_goal - rest_max[k + 1], 0)
        new_hi = min(lo + len(best) - 1 + w_max[k], hi_goal - rest_min[k + 1], units)
        if new_hi < new_lo:
            raise ValueError(f"no combination of the candidate sparsities reaches the target {target}")
        nxt = torch.full((new_hi - new_lo + 1,), inf, dtype=torch.float64)
        arg = torch.full((new_hi - new_lo + 1,), -1, dtype=torch.int8)
        for j, (_, err, w) in enumerate(cands):
            a, b = max(new_lo, lo + w), min(new_hi, lo + len(best) - 1 + w)  # budgets this candidate reaches
            if a > b:
                continue
            shifted = best[a - w - lo : b - w - lo + 1] + err
            seg, segarg = nxt[a - new_lo : b - new_lo + 1], arg[a - new_lo : b - new_lo + 1]
            better = shifted < seg
            seg.copy_(torch.where(better, shifted, seg))
            segarg.masked_fill_(better, j)
        lo, best = new_lo, nxt
        choice.append((cands, new_lo, arg))
    if not math.isfinite(float(best.min())):
        raise ValueError(f"no combination of the candidate sparsities reaches the target {target}")
    out, b = {}, lo + int(torch.argmin(best))
    for name, (cands, start, arg) in zip(reversed(names), reversed(choice), strict=True):
        s, _, w = cands[int(arg[b - start])]
        out[name] = s
        b -= w
    return {n: out[n] for n in names}


def groups(name: str) -> tuple[str, str]:
    """The two coefficient groups a layer belongs to: its block (``model.layers.3``) and its kind (the leaf
    name, ``down_proj``; an expert's ``experts.down_proj``)."""
    m = re.search(r"^(.*?\.\d+)\.(.*)$", name)
    if m is None:
        return name, name
    kind = re.sub(r"\.\d+\.", ".", "." + m.group(2) + ".").strip(".")
    return m.group(1), kind


def coefficients(group_logs: dict[str, float], names: list[str],
                 anchor: dict[str, float] | None = None) -> dict[str, float]:
    """Each layer's sensitivity coefficient: its anchor (1 when none) x exp(its block's + its kind's
    log-coefficient)."""
    out = {}
    for n in names:
        block, kind = groups(n)
        out[n] = (anchor or {}).get(n, 1.0) * math.exp(group_logs.get(block, 0.0) + group_logs.get(kind, 0.0))
    return out


def anchor_for(tables: dict[str, dict], alloc: dict[str, float | str]) -> dict[str, float]:
    """Coefficients under which the dynamic program's choice is (close to) ``alloc``: numel / (the slope of
    each layer's error at its sparsity there), so every layer's marginal cost per pruned weight is equal at
    that allocation. Normalised to mean 1."""
    out = {}
    for n, t in tables.items():
        at = cost(t, str(alloc[n])) if "costs" in t else float(alloc[n])  # a bit-width's key: its saving
        pts = sorted((cost(t, s), float(e)) for s, e in t["errors"].items())
        below = [p for p in pts if p[0] < at - 1e-9] or pts[:1]
        above = [p for p in pts if p[0] > at + 1e-9] or pts[-1:]
        (s0, e0), (s1, e1) = below[-1], above[0]
        slope = (e1 - e0) / (s1 - s0) if s1 > s0 else 0.0
        out[n] = int(t["numel"]) / max(slope, 1e-12)
    mean = sum(out.values()) / len(out)
    return {n: c / mean for n, c in out.items()}


def snap(alloc: dict[str, float], tables: dict[str, dict], target: float) -> dict[str, float]:
    """The allocation over the tables' candidate sparsities nearest to ``alloc`` (least parameter-weighted
    squared distance) whose global sparsity is the target (to 0.1%): e.g. OWL's continuous block sparsities
    on SPDY's grid, so that its stored layer versions can assemble and score it."""
    dist = {n: {"numel": t["numel"], "errors": {s: (float(s) - float(alloc[n])) ** 2 for s in t["errors"]}}
            for n, t in tables.items()}
    return dp(dist, target)


def owl_lambdas(radius: float, step: float = 0.02) -> list[float]:
    """OWL λ values step, 2·step, ... up to ``radius``: SPDY's further starting points (up to its candidate
    grid's radius, as a wider λ would be clipped by the grid)."""
    return [round(step * k, 6) for k in range(1, int(radius / step + 1e-9) + 1)]


# the λ that --owl-lambda auto tries, each with a real compression on the scoring windows (0: uniform)
OWL_AUTO = (0.0, *owl_lambdas(0.12, 0.03))


def spdy_search(tables: dict[str, dict], target: float, score, steps: int, seed: int = 0,
                log=None, starts: dict[str, dict[str, float]] | None = None, uniform: str | None = None) -> dict:
    """SPDY's search (Frantar & Alistarh 2022): the dynamic program over the error tables, its layer errors
    weighted by sensitivity coefficients that a local search tunes to minimise ``score(allocation)``, the
    calibration loss of the model assembled with those sparsities.

    The starting points are scored: the plain dp (all coefficients 1), uniform, and ``starts`` (named
    allocations over the tables' candidates, e.g. OWL's for a few λ, ``snap``-ed); the search starts from the
    best one's coefficients (``anchor_for`` it, which make the dp choose about that allocation).
    The coefficients are then tuned per block and per layer kind (log c = anchor + a_block + b_kind: tens of
    knobs instead of one per layer, so a few dozen scored candidates move them usefully): each step perturbs a
    shrinking random subset of the log-coefficients by a shrinking Gaussian and keeps the candidate if its loss
    is lower; an allocation already scored is not scored again. Over bit-width tables (``costs``) the saving is
    ``dp``'s ``at_least`` (the average never over the budget) and ``uniform``, when given, is the width every
    layer takes in the uniform start; over sparsities the uniform start is the target's. Returns
    {"anchor", "group_log_coefficients", "coefficients", "sparsities", "loss", "history"}.
    """
    names = list(tables)
    rng = random.Random(seed)
    keys = sorted({g for n in names for g in groups(n)})
    logs = dict.fromkeys(keys, 0.0)
    seen: dict[tuple, float] = {}

    def evaluate(alloc: dict[str, float]) -> float:
        key = tuple(alloc[n] for n in names)
        if key not in seen:
            seen[key] = float(score(alloc))
        return seen[key]

    history = []
    bitwise = any("costs" in t for t in tables.values())
    best_alloc = dp(tables, target, at_least=bitwise)
    best = evaluate(best_alloc)
    history.append({"step": 0, "candidate": "dp", "loss": best, "kept": True})
    anchor_name, anchor = "dp", None
    others = dict(starts or {})
    level = uniform if bitwise else str(target)
    if level is not None and all(level in tables[n]["errors"] for n in names):
        others = {"uniform": dict.fromkeys(names, level if bitwise else target)} | others
    for name, alloc in others.items():
        loss = evaluate(alloc)
        history.append({"step": 0, "candidate": name, "loss": loss, "kept": loss < best})
        if loss < best:
            best, best_alloc, anchor_name, anchor = loss, dict(alloc), name, anchor_for(tables, alloc)
    for step in range(1, steps + 1):
        left = 1 - (step - 1) / max(steps, 1)
        cand = dict(logs)
        for k in rng.sample(keys, max(1, round((0.1 + 0.3 * left) * len(keys)))):
            cand[k] += rng.gauss(0.0, 0.15 + 0.6 * left)
        alloc = dp(tables, target, weights=coefficients(cand, names, anchor), at_least=bitwise)
        fresh = tuple(alloc[n] for n in names) not in seen
        loss = evaluate(alloc)
        kept = loss < best
        history.append({"step": step, "loss": loss, "kept": kept, "fresh": fresh})
        if log is not None:
            log(step, loss, best)
        if kept:
            best, best_alloc, logs = loss, alloc, cand
    return {"anchor": anchor_name, "group_log_coefficients": logs,
            "coefficients": coefficients(logs, names, anchor), "sparsities": best_alloc, "loss": best,
            "history": history}
