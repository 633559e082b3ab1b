"""Planning a non-uniform allocation: one streamed pass over the dense model measures what OWL or SPDY need
(allocate.py holds their math, spdy.py the search's plumbing), then the per-layer sparsities are chosen."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from llmprune import allocate, distributed, spdy
from llmprune.allocate import AllocationSpec
from llmprune.arch import get_weight, set_weight
from llmprune.block import CompressSpec, compress_block, shared_hessians
from llmprune.data import (
    batched,
)
from llmprune.engine import BlockPass, Stream
from llmprune.errors import UsageError
from llmprune.hessian import (
    HessianCollector,
)
from llmprune.progress import Progress, track
from llmprune.solve import solve_bits, solve_levels
from llmprune.targets import on_device

log = logging.getLogger(__name__)


def plan_sparsities(
    model: nn.Module, windows: torch.Tensor, alloc: AllocationSpec, spec: CompressSpec,
    linears: dict[str, dict[str, nn.Module]], device: torch.device, batch_size: int, reuse: dict | None = None,
    progress: Progress = True,
) -> dict:
    """Per-layer sparsities for a non-uniform allocation, from one streamed pass over the dense model.

    owl: each block's outlier ratio of Wanda scores -> block sparsities. spdy: each linear's relative error at
    every candidate sparsity (``spec``'s solver on that linear's Hessian, the solved versions kept) -> a
    dynamic program whose sensitivities are searched on the calibration loss (``spdy.search``). ``reuse``:
    the ``allocation`` of an earlier spdy run's report for the same target, which skips the pass and the
    search. ``batch_size``: calibration windows per forward. Returns the report's ``allocation`` entry; its
    ``sparsities`` maps full linear names to sparsities. With ``alloc.bits`` spdy searches bit-widths instead
    (each linear solved on each grid at the run's sparsity) and the entry's ``bits`` maps names to bit-widths.
    """
    target = alloc.target
    numel = {f"{p}.{n}": get_weight(m).numel() for p, lin in linears.items() for n, m in lin.items()}
    if reuse is not None:
        tables = reuse.get("tables")
        if not tables or {k: t["numel"] for k, t in tables.items()} != numel:
            raise UsageError("--reuse-errors: its error tables do not match this model's layers (names and"
                             " sizes): reuse a report of the same model and --skip list")
        if reuse.get("method") != "spdy" or ("bits" if alloc.bits else "sparsities") not in reuse:
            raise UsageError("--reuse-errors needs the report of an --allocation spdy run (its searched"
                             f" allocation{' of bit-widths' if alloc.bits else ''}): pass one, or drop --reuse-errors")
        what = "average bits" if alloc.bits else "sparsity"
        if abs(float(reuse.get("target", -1)) - target) > 1e-9 or list(reuse.get("choices", [])) != list(alloc.bits):
            raise UsageError(f"--reuse-errors: that allocation was searched for {what} {reuse.get('target')}"
                             f"{' over ' + str(reuse.get('choices')) if alloc.bits else ''}, not {target}: run the"
                             " search again (drop --reuse-errors)")
        return dict(reuse)

    prefixes = list(linears)
    ratios: list[float] = []
    tables: dict[str, dict] = {}
    cands = allocate.candidates(target, alloc.spdy_radius)
    quants = {allocate.bit_key(b): dataclasses.replace(spec.solve.quant, wbits=b) for b in alloc.bits}
    store = spdy.VersionStore() if alloc.method == "spdy" else None

    def on_block(i: int, block: nn.Module, block_pass: BlockPass) -> None:
        with on_device(block, linears[prefixes[i]]) as lin:
            collector = HessianCollector(lin, hessian_dtype=spec.hessian_dtype,
                                         diagonal=store is None)  # owl: Wanda scores only
            with collector:
                if block_pass.sequential_fits(lin) is None:  # one forward: its outputs feed the next block
                    block_pass.sequential(lin, lambda name, xs: None)
                else:  # the engine runs the block again for them
                    block_pass()
        leader, hessians, _ = shared_hessians(lin, collector)
        reached = [n for n in lin if n in leader]
        pairs = [(get_weight(lin[n]), hessians[leader[n]]) for n in reached]
        ratios.append(allocate.outlier_ratio(pairs, alloc.owl_m) if pairs else 0.0)
        if store is None:
            return
        versions: dict[str, Tensor] = {}
        for name, (W, H) in zip(reached, pairs, strict=True):
            errors = {}
            full = f"{prefixes[i]}.{name}"
            if getattr(model, "block_source", None) is None:
                versions[f"{full}@dense"] = W
            levels = solve_bits(W, H, spec.sparsity, quants, spec.solve) if quants else \
                solve_levels(W, H, cands, spec.solve)
            for s, weight, err in levels:
                errors[str(s)] = err
                versions[f"{full}@{s}"] = weight
            tables[full] = {"numel": W.numel(), "errors": errors}
            if quants:
                tables[full]["costs"] = allocate.bit_costs(alloc.bits)
        store.put(i, versions)

    sizes = [sum(numel[f"{p}.{n}"] for n in linears[p]) for p in prefixes]

    def owl_at(lam: float) -> dict[str, float]:
        per_block = allocate.owl(ratios, sizes, target, lam) if lam > 0 else [target] * len(prefixes)
        return {f"{p}.{n}": s for p, s in zip(prefixes, per_block, strict=True) for n in linears[p]}

    try:
        Stream(model, batched(distributed.shard(windows), batch_size), device,
               progress=progress).run(on_block, desc=f"{alloc.method} plan")
        if store is not None:  # OWL's allocations for a few λ, rounded to the grid, are further starting points
            owls = {} if alloc.bits else {
                f"owl lambda={lam:g}": allocate.snap({n: a[n] for n in tables}, tables, target)
                for lam in allocate.owl_lambdas(alloc.spdy_radius) for a in [owl_at(lam)]}
            return spdy.search(model, windows, alloc, batch_size, linears, device, tables, store, progress,
                               starts=owls)
    finally:
        if store is not None:
            store.close()
    report = {"method": "owl", "target": target, "owl_lambda": alloc.owl_lambda,
              "block_outlier_ratios": dict(zip(prefixes, ratios, strict=True))}
    if alloc.owl_lambda == "auto":
        report["lambda_search"] = _owl_trials(model, windows, alloc, spec, linears, device, batch_size, owl_at,
                                              progress)
        report["owl_lambda"] = min(report["lambda_search"], key=lambda c: c["loss"])["owl_lambda"]
    return report | {"sparsities": owl_at(report["owl_lambda"])}


def _owl_trials(model: nn.Module, windows: Tensor, alloc: AllocationSpec, spec: CompressSpec,
                linears: dict[str, dict[str, nn.Module]], device: torch.device, batch_size: int,
                owl_at: Callable[[float], dict[str, float]], progress: Progress) -> list[dict]:
    """--owl-lambda auto: the model compressed for real (``spec``'s solver and order) with OWL's allocation
    at each λ of ``allocate.OWL_AUTO`` on the first ``owl_samples`` windows, and scored by the calibration
    loss of those windows through it (streamed in the same pass). Each block's dense weights are put back
    once the next block has run, so the model is whole again after every trial. Returns [{owl_lambda,
    loss}]. (Scoring OWL's allocations assembled from layer versions solved on dense inputs, as spdy scores,
    ranked λ unlike these real runs: docs/results.md.)"""
    prefixes = list(linears)
    batches = batched(distributed.shard(windows[: alloc.owl_samples]), batch_size)
    lazy = getattr(model, "block_source", None) is not None  # its blocks are read anew on every pass
    captured: dict = {}

    def trial(sparsities: dict[str, float]) -> float:
        saved: list[tuple[int, nn.Module, dict[str, Tensor]]] = []

        def restore() -> None:
            for i, block, weights in saved:
                with on_device(block, linears[prefixes[i]]) as lin:
                    for n, m in lin.items():
                        set_weight(m, weights[n].to(get_weight(m).device))
            saved.clear()

        def on_block(i: int, block: nn.Module, block_pass: BlockPass) -> None:
            restore()  # the previous block has fed this one: its dense weights back
            with on_device(block, linears[prefixes[i]]) as lin:
                if not lazy:
                    saved.append((i, block, {n: get_weight(m).detach().to("cpu", copy=True) for n, m in lin.items()}))
                compress_block(prefixes[i], lin, block_pass, spec, None, sparsities)

        try:
            return spdy.calibration_loss(model, batches, device, on_block, captured)
        finally:
            restore()

    out = []
    for lam in track(allocate.OWL_AUTO, len(allocate.OWL_AUTO), "owl lambda", progress, unit="trial"):
        out.append({"owl_lambda": lam, "loss": trial(owl_at(lam))})
        log.info("owl lambda %g: calibration loss %.4f", lam, out[-1]["loss"])
    return out
