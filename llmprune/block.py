"""Compressing one decoder block: which linears it holds, their Hessians collected in one of three orders
(sequential in one forward, two passes, or spread over torchrun ranks) and each solved (solve.py), then the
block optionally reconstructed as a whole (reconstruct.py does the training)."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmprune import distributed, experts
from llmprune.arch import find_blocks, get_weight
from llmprune.checkpoint import OutputSpec
from llmprune.engine import BlockPass
from llmprune.errors import UsageError
from llmprune.hessian import (
    HessianCollector,
    accumulator_dtype,
    diagonal_update,
    hessian_update,
    layer_input_width,
)
from llmprune.quant import QuantParams
from llmprune.reconstruct import ReconstructSpec, module_outputs, reconstruct_block, split_first_group, trainables
from llmprune.solve import LayerReport, SolveSpec, solve_linear
from llmprune.targets import block_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressSpec:
    """How each block's linears are chosen and compressed."""

    solve: SolveSpec
    sparsity: float  # the target of every linear (an allocation overrides it per linear)
    sequential: bool = True  # sublayer by sublayer in one forward per block (else two passes)
    hessian_dtype: str = "auto"
    min_expert_tokens: int = 64  # experts whose Hessian got fewer routed tokens fall back to solve.fallback
    skip: tuple[str, ...] = ()  # regexes of linear names left dense
    drop_experts: float = 0.0  # fraction of each MoE layer's experts removed (REAP)
    changes_weights: bool = True  # any linear is pruned or quantized (else the run only drops experts)
    obc_max_cols: int | None = None  # obc: the widest layer it takes


def prunable_linears(model: nn.Module, spec: CompressSpec, output: OutputSpec | None = None
                     ) -> dict[str, dict[str, nn.Module]]:
    """block path prefix -> {name in block: linear}, with spec.skip applied and N:M / group fit checked, and
    checked against the ``output`` format."""
    path, blocks = find_blocks(model)
    pattern = spec.solve.pattern
    quant = spec.solve.quant
    compressed = output is not None and output.compressed_tensors
    out: dict[str, dict[str, nn.Module]] = {}
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}"
        chosen = {}
        if compressed and experts.block_views(block):
            raise UsageError(f"{prefix} holds fused mixture-of-experts weights, which llmprune cannot write as"
                             " compressed-tensors yet: use --format dense (the experts are pruned and quantized"
                             " there too)")
        for name, mod in block_targets(block).items():
            full = f"{prefix}.{name}"
            if any(re.search(rx, full) for rx in spec.skip):
                continue
            cols = get_weight(mod).shape[1]
            if pattern is not None and cols % pattern.m:
                raise UsageError(
                    f"layer {full} has {cols} inputs, not a multiple of {pattern.m}, so it cannot hold"
                    f" {pattern}: skip it with --skip '{re.escape(name)}$' or use another pattern"
                )
            if quant is not None and quant.grid in ("nvfp4", "mxfp4") and cols % quant.group_size:
                raise UsageError(
                    f"layer {full} has {cols} inputs, not a multiple of {quant.group_size}, so {quant.grid}'s groups of"
                    f" {quant.group_size} cannot tile it: --skip '{re.escape(name)}$' or use another --grid"
                )
            if quant is not None and quant.group_size > 0 and cols % quant.group_size:
                fits = " or ".join([str(g) for g in (128, 64, 32, 16, 8) if cols % g == 0][:2])
                raise UsageError(
                    f"--group-size {quant.group_size} does not divide the {cols} inputs of layer {full}: pick a"
                    f" divisor of {cols}{f' (e.g. {fits})' if fits else ''}, -1 for per-channel, or --skip"
                    f" '{re.escape(name)}$'"
                )
            if spec.obc_max_cols is not None and cols > spec.obc_max_cols:
                raise UsageError(
                    f"layer {full} has {cols} inputs, more than --obc-max-cols {spec.obc_max_cols} (obc's work"
                    f" grows as rows x cols³): use --method admm, raise --obc-max-cols, or --skip '{re.escape(name)}$'"
                )
            if compressed and not isinstance(mod, nn.Linear):
                raise UsageError(
                    f"layer {full} is a {type(mod).__name__}, which compressed-tensors cannot store:"
                    " use --format dense"
                )
            chosen[name] = mod
        out[prefix] = chosen
    names = [f"{p}.{n}" for p in out for n in block_targets(model.get_submodule(p))]
    for rx in spec.skip:
        if not any(re.search(rx, n) for n in names):
            raise UsageError(f"--skip {rx!r} matches no linear of this model (e.g. {names[0]}): fix the regex")
    if not any(out.values()):
        raise UsageError("every linear is skipped: nothing to compress; loosen --skip")
    return out


def compress_block(
    block_prefix: str, linears: dict[str, nn.Module], block_pass: BlockPass, spec: CompressSpec,
    grids: dict[str, QuantParams] | None = None, sparsities: dict[str, float] | None = None,
    bits: dict[str, int] | None = None,
) -> tuple[list[LayerReport], str | None]:
    """Compress one block's linears; return their reports and, when the spec asked for a sequential pass
    that could not be had, why not (then the Hessians came from the dense block, as in the two-pass order).

    Sequential (``spec.sequential``): one pass, sublayer by sublayer (``sequential_block``). Two-pass:
    Hessians of every linear in one pass over the calibration data, then one solver call per linear (the
    engine then runs the block again for the next block's inputs). ``grids``, when given, receives each
    quantized linear's grid under its full name (checkpoint writers need it to store integer codes);
    ``sparsities`` overrides the spec's sparsity per full name, ``bits`` its grid's bit-width. Experts
    (views named ``...experts.E....``) that received fewer than ``spec.min_expert_tokens`` tokens, none
    included, are pruned by the fallback.
    """
    solve = spec.solve

    def level(name: str) -> tuple[SolveSpec, float]:
        """The solve spec and sparsity of one linear (the allocation's where it has one)."""
        full = f"{block_prefix}.{name}"
        own = solve
        if bits and full in bits:
            own = dataclasses.replace(solve, quant=dataclasses.replace(solve.quant, wbits=bits[full]))
        return own, (sparsities or {}).get(full, spec.sparsity)

    if solve.data_free:  # no data needed: the engine's one forward
        return [solve_linear(f"{block_prefix}.{n}", m, None, *level(n), None, grids)
                for n, m in linears.items()], None
    fallback = None
    if spec.sequential:
        fallback = block_pass.sequential_fits(linears)
        if distributed.active():  # every rank takes the same path, or the collectives would not pair up
            if any(experts.expert_of(n) is not None for n in linears):
                fallback = "torchrun: experts are reached in a different order on each rank's tokens"
            fallback = next((f for f in distributed.gather_objects(fallback) if f), None)
        if fallback is None:
            return sequential_block(block_prefix, linears, block_pass, spec, level, grids), None
        log.warning("%s: two passes instead of one: %s", block_prefix, fallback)
    collector = HessianCollector(linears, hessian_dtype=spec.hessian_dtype, diagonal=solve.diagonal_only)
    with collector:
        block_pass()
    if distributed.active():
        return _compress_block_ranks(block_prefix, linears, collector, spec, level, grids), fallback
    reports = []
    # how many linears still need each Hessian: it is freed after the last one's solve, so the widest
    # layer's solve does not run beside the whole block's Hessians
    uses = Counter(collector.leader[n] for n in linears if n in collector.leader)
    for name, mod in linears.items():
        if name not in collector.leader:
            if experts.expert_of(name) is not None:  # routed no token: pruned without data, reported
                reports.append(solve_linear(f"{block_prefix}.{name}", mod, None, *level(name), None,
                                            grids, tokens=0, method=solve.fallback))
            continue  # never called on calibration data: nothing to calibrate on, left dense
        lead = collector.leader[name]
        tokens = collector.n[lead]
        few = experts.expert_of(name) is not None and tokens < spec.min_expert_tokens
        reports.append(solve_linear(f"{block_prefix}.{name}", mod, collector.hessian(name), *level(name),
                                    f"{block_prefix}.{lead}" if lead != name else None, grids, tokens=tokens,
                                    method=solve.fallback if few else None))
        uses[lead] -= 1
        if not uses[lead]:
            collector.drop(lead)
    return reports, fallback


def shared_hessians(linears: dict[str, nn.Module], collector: HessianCollector
                    ) -> tuple[dict[str, str], dict[str, Tensor], dict[str, int]]:
    """The collected Hessians as the solvers take them (fp32): (leader of each linear reached, Hessian per
    leader, tokens per leader). Under torchrun every rank's Hessians are summed into the all-ranks ones and the
    groups (which linears share an input) merged over the ranks, since an expert may be reached on one rank
    only; the result is the same on every rank."""
    if not distributed.active():
        return collector.leader, {lead: collector.hessian(lead) for lead in collector.groups()}, collector.n
    leader: dict[str, str] = {}
    for part in distributed.gather_objects(dict(collector.leader)):
        for name, lead in part.items():
            leader.setdefault(name, lead)
    H, n = {}, {}
    diag = collector.diagonal
    for lead in dict.fromkeys(leader[name] for name in linears if name in leader):
        cols = layer_input_width(linears[lead])
        mine = collector.H.get(lead)
        H[lead], n[lead] = distributed.sum_mean(mine, collector.n.get(lead, 0), (cols,) if diag else (cols, cols),
                                                get_weight(linears[lead]).device)
    return leader, H, n


def _compress_block_ranks(block_prefix: str, linears: dict[str, nn.Module], collector: HessianCollector,
                          spec: CompressSpec, level: Callable[[str], tuple[SolveSpec, float]],
                          grids: dict[str, QuantParams] | None) -> list[LayerReport]:
    """torchrun, two-pass: the all-ranks Hessians, each linear solved on the rank that owns it (balanced by
    estimated cost, rows x cols²), its new weights (and grid) broadcast from there, the reports gathered."""
    leader, H, n = shared_hessians(linears, collector)
    collector.H.clear()
    todo = [name for name in linears if name in leader or experts.expert_of(name) is not None]
    costs = {name: float(get_weight(linears[name]).shape[0]) * get_weight(linears[name]).shape[1] ** 2
             for name in todo}
    owner = distributed.assign(costs)
    mine: dict[str, LayerReport] = {}
    my_grids: dict[str, QuantParams] = {}
    for name in todo:
        if owner[name] != distributed.rank():
            continue
        mod, full = linears[name], f"{block_prefix}.{name}"
        if name not in leader:  # an expert no rank routed a token to
            mine[name] = solve_linear(full, mod, None, *level(name), None, my_grids, tokens=0,
                                      method=spec.solve.fallback)
            continue
        lead = leader[name]
        few = experts.expert_of(name) is not None and n[lead] < spec.min_expert_tokens
        mine[name] = solve_linear(full, mod, H[lead], *level(name),
                                  f"{block_prefix}.{lead}" if lead != name else None, my_grids, tokens=n[lead],
                                  method=spec.solve.fallback if few else None)
    H.clear()
    for name in todo:
        distributed.broadcast_(get_weight(linears[name]), owner[name])
    reports: dict[str, LayerReport] = {}
    for part_reports, part_grids in distributed.gather_objects((mine, my_grids)):
        reports.update(part_reports)
        if grids is not None:
            grids.update(part_grids)
    return [reports[name] for name in todo]


def sequential_block(
    block_prefix: str, linears: dict[str, nn.Module], block_pass: BlockPass, spec: CompressSpec,
    level: Callable[[str], tuple[SolveSpec, float]], grids: dict[str, QuantParams] | None = None,
) -> list[LayerReport]:
    """True-sequential: each linear's Hessian from its inputs as the block's already-compressed sublayers
    before it make them, in one forward (the engine keeps its outputs for the next block).

    Linears met with the very same input tensors as the previous one (q/k/v, gate/up) share its Hessian, as
    in the two-pass order. Reports come in the block's module order. Experts with too few tokens: as in
    ``compress_block``.
    """
    reports: dict[str, LayerReport] = {}
    last: dict = {}  # the previous group's inputs, Hessian and first linear

    def on_group(name: str, xs: list[Tensor]) -> None:
        mod = linears[name]
        if last and len(xs) == len(last["xs"]) and all(a is b for a, b in zip(xs, last["xs"], strict=True)):
            H, lead, n = last["H"], last["lead"], last["n"]
        else:
            last.clear()  # the previous group's Hessian is not needed any more
            cols = layer_input_width(mod)
            diag = spec.solve.diagonal_only
            H = torch.zeros((cols,) if diag else (cols, cols), dtype=accumulator_dtype(spec.hessian_dtype),
                            device=xs[0].device)
            n = 0
            for x in xs:
                if diag:
                    H, n = diagonal_update(H, n, x.reshape(-1, cols))
                else:
                    H, n = hessian_update(H, n, x.reshape(-1, cols), spec.hessian_dtype)
            H, n = distributed.sum_mean(H, n, tuple(H.shape), H.device)  # torchrun: every rank's tokens
            lead = name
            last.update(xs=xs, H=H, lead=name, n=n)
        few = experts.expert_of(name) is not None and n < spec.min_expert_tokens
        reports[name] = solve_linear(f"{block_prefix}.{name}", mod, H, *level(name),
                                     f"{block_prefix}.{lead}" if lead != name else None, grids, tokens=n,
                                     method=spec.solve.fallback if few else None)
        distributed.broadcast_(get_weight(mod), 0)  # torchrun: every rank solved it alike; rank 0's stands

    block_pass.sequential(linears, on_group)
    last.clear()
    for name, mod in linears.items():  # experts routed no token: pruned without data, reported
        if name not in reports and experts.expert_of(name) is not None:
            reports[name] = solve_linear(f"{block_prefix}.{name}", mod, None, *level(name), None,
                                         grids, tokens=0, method=spec.solve.fallback)
    return [reports[n] for n in linears if n in reports]  # linears never called: left dense


def reconstruction_targets(block: nn.Module, chosen: dict[str, nn.Module], block_pass: BlockPass,
                            spec: ReconstructSpec) -> dict:
    """What the block is trained toward, computed by the dense block before any linear is solved: its outputs
    on the dense stream (target dense, while carried; then they are also the dense stream's next inputs) or
    on this stream; with sublayer granularity also the first group's module outputs (the attention's)."""
    dense = spec.target == "dense" and block_pass.dense_inputs is not None
    hidden = block_pass.dense_inputs if dense else block_pass.inputs
    first = split_first_group(block, list(chosen))[0] if spec.granularity == "sublayer" else None
    store = block_pass.stream.store
    outs: list[Tensor] = []
    mids: list[Tensor] = []
    for b, h in enumerate(hidden):
        if first is None:
            outs.append(block_pass.run_batch(b, h).to(store))
        else:
            mid = module_outputs(block.get_submodule(first),
                                 lambda b=b, h=h: outs.append(block_pass.run_batch(b, h).to(store)))
            mids.append(mid.to(store))
    if dense:
        block_pass.dense_outputs = outs
    return {"targets": outs, "mids": mids or None, "on": "dense" if dense else "compressed"}


def reconstruct_trained(prefix: str, block: nn.Module, trained: dict[str, nn.Module], block_pass: BlockPass,
                        spec: ReconstructSpec, targets: dict, grids: dict[str, QuantParams], masked: bool) -> dict:
    """Train ``trained`` (linears by name in the block; ``grids`` by the same names) toward ``targets``
    (reconstruct.py); the block's outputs then become the next block's inputs. Returns the report entry."""
    params = trainables(trained, grids, masked, block, spec.norms)
    stream = block_pass.stream
    if stream.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(stream.device)
    before = block_pass.outputs if block_pass.outputs is not None else block_pass.forward()
    kept = [*block_pass.inputs, *targets["targets"], *(targets["mids"] or []), *before,
            *(block_pass.dense_inputs or [])]
    outs, entry = reconstruct_block(block, block_pass.run_batch, len(block_pass.inputs), targets["targets"],
                                    before, params, spec, targets["mids"], reduce=distributed.all_sum,
                                    reduce_grads=distributed.sum_)
    block_pass.outputs = outs
    entry.update(target=targets["on"], granularity=spec.granularity,
                 kept_bytes=sum(t.numel() * t.element_size() for t in {id(t): t for t in kept}.values()),
                 peak_device_bytes=torch.cuda.max_memory_allocated(stream.device)
                 if stream.device.type == "cuda" else None)
    log.info("%s: reconstruction %s, block loss %.4g -> %.4g in %d steps (%.1f s)", prefix,
             "reverted" if entry["reverted"] else "kept", entry["loss_before"], entry["trained_loss"],
             entry["steps"], entry["seconds"])
    return entry


def reconstruct_solved(prefix: str, block: nn.Module, lin: dict[str, nn.Module], block_pass: BlockPass,
                 spec: ReconstructSpec, targets: dict, reports: list[LayerReport],
                 block_grids: dict[str, QuantParams], masked: bool) -> dict:
    """The solved linears of a block reconstructed; their reports' zero counts taken again from the block."""
    solved = {r.name.removeprefix(prefix + ".") for r in reports}
    entry = reconstruct_trained(prefix, block, {n: m for n, m in lin.items() if n in solved}, block_pass, spec,
                                targets, {k.removeprefix(prefix + "."): v for k, v in block_grids.items()}, masked)
    for r in reports:
        W = get_weight(lin[r.name.removeprefix(prefix + ".")])
        r.zeros = int((W == 0).sum())
        r.sparsity = r.zeros / W.numel()
    return entry


def dense_outputs_of_original(i: int, block: nn.Module, block_pass: BlockPass, source) -> list[Tensor] | None:
    """A resumed run's dense stream through block ``i`` as the input checkpoint holds it (the block on the
    device is the finished, compressed one); None (the dense stream ends, the report says so) if it cannot."""
    from torch.func import functional_call

    if source is None:
        return None
    try:
        dense = {k: v.to(block_pass.stream.device) for k, v in source.original_tensors(i, block).items()}
        return block_pass.forward(block_pass.dense_inputs,
                                  lambda *a, **k: functional_call(block, dense, a, k))
    except (RuntimeError, ValueError, UsageError) as exc:  # e.g. fewer experts or channels in the finished block
        log.warning("block %d: the dense stream cannot be rebuilt on resume (%s): later blocks reconstruct"
                    " toward the dense block on the compressed stream", i, str(exc).splitlines()[0])
        return None
