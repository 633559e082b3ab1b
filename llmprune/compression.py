"""From a run's specs to a pruned model: calibration windows, the streaming engine, one solver call per linear."""

from __future__ import annotations

import copy
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune import allocate, distributed, experts, kernels, spdy
from llmprune.allocate import AllocationSpec
from llmprune.arch import find_blocks, find_routers, get_weight, is_moe, set_weight
from llmprune.checkpoint import OutputSpec
from llmprune.data import (
    CalibSpec,
    batched,
    calibration_windows,
    document_windows,
    joined_text,
    load_documents,
    tokenize,
    window_layout,
    windows_hash,
    with_bos,
)
from llmprune.engine import BlockPass, Stream, bound, default_device
from llmprune.errors import CholeskyError, NonFiniteError, UsageError, overflow_hint
from llmprune.hessian import (
    HessianCollector,
    accumulator_dtype,
    diagonal_update,
    hessian_update,
    layer_input_width,
)
from llmprune.loading import context_length
from llmprune.pattern import Pattern
from llmprune.progress import Progress, track
from llmprune.quant import QuantParams, QuantSpec, stored_bits
from llmprune.reconstruct import ReconstructSpec, module_outputs, reconstruct_block, split_first_group, trainables
from llmprune.solvers import SOLVERS
from llmprune.solvers.hinv import dead_inputs, prepare_weight
from llmprune.solvers.refit import refit_result
from llmprune.solvers.result import output_error, relative_error
from llmprune.solvers.sparsegpt import SparseGPTOptions, sparsegpt_levels
from llmprune.targets import block_targets, on_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveSpec:
    """What solves one linear: the method, its own options, the pattern and grid it solves to."""

    method: str  # a key of solvers.SOLVERS
    # the method's own options (solvers/<method>.py: SparseGPTOptions, AdmmOptions, ObcOptions); None: it has
    # none (wanda, magnitude, rtn)
    options: SparseGPTOptions | None = None
    pattern: Pattern | None = None
    quant: QuantSpec | None = None
    # the SparseGPT/GPTQ sweep's options: sparsegpt's own, the sweep that quantizes a refit's mask, spdy's
    # levels
    sweep: SparseGPTOptions = field(default_factory=SparseGPTOptions)
    refit_iters: int | None = None  # re-solve the kept weights of the mask (PCG steps); None: no refit
    fallback: str = "magnitude"  # the data-free solver of an expert with too few calibration tokens
    diagonal_only: bool = False  # the solver reads only the Hessian's diagonal (Wanda's ‖X_j‖²)
    data_free: bool = False  # the solver reads no Hessian (magnitude, rtn without refit)

    def kwargs(self) -> dict:
        """The solver's keyword arguments."""
        return self.options.kwargs() if self.options is not None else {}


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


@dataclass(frozen=True)
class RunSpec:
    """A compression run, resolved once from its recipe (recipe.Recipe.resolve) into each stage's spec."""

    compress: CompressSpec
    calibration: CalibSpec
    needs_data: bool  # calibration windows and forwards at all (magnitude and rtn alone need none)
    allocation: AllocationSpec | None = None  # None: uniform
    reconstruction: ReconstructSpec | None = None  # None: off
    output: OutputSpec = field(default_factory=OutputSpec)
    device: str = "auto"
    dtype: str = "auto"
    label: str = ""  # short human description for the log and the progress bar
    recipe: dict = field(default_factory=dict)  # the recipe as written, for the report and the resume journal


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    zeros: int  # exact count of zero weights after pruning
    sparsity: float  # zeros / numel
    rel_error: float | None  # ||WX - ŴX||² / ||WX||² on the calibration inputs
    quant_error: float | None  # the part of rel_error due to rounding the kept weights, by the steps' losses
    bits: float | None  # bits per weight as stored (codes + scales + zero points), None: not quantized
    damp_frac: float
    retries: int
    seconds: float
    hessian_of: str | None  # the linear whose (shared) Hessian this one used
    iterations: int | None = None  # admm / refit: iterations run
    # admm: its error over its SparseGPT warm start's (≤ 1: never worse on the layer's objective)
    vs_sparsegpt: float | None = None
    method: str | None = None  # the solver used (an expert with too few tokens: magnitude, not the recipe's)
    tokens: int | None = None  # calibration tokens its Hessian came from (an expert: those routed to it)
    # the implementation of its sweep's column loop (llmprune/kernels/obs_update.py): "triton" (the fused kernel),
    # "torch", or "torch+triton" (the kernel failed on the device mid-layer); None: the solver has no sweep
    kernel: str | None = None
    error_seconds: float | None = None  # measuring rel_error (after the solve's ``seconds``)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered"
                         f" from 0: use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return bound(device)


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




def solve_linear(
    full: str, mod: nn.Module, H: Tensor | None, spec: SolveSpec, sparsity: float, hessian_of: str | None,
    grids: dict[str, QuantParams] | None = None, tokens: int | None = None, method: str | None = None,
) -> LayerReport:
    """One solver call on one linear: its new weights written back, its grid kept, its report returned.

    ``method`` overrides the spec's (an expert with too few calibration tokens is pruned by magnitude; its
    few-token Hessian, when there is one, still measures the error); ``tokens``: the Hessian's token count.
    """
    method = method or spec.method
    W = get_weight(mod)
    H = H.to(W.device) if H is not None else None
    if H is not None and not bool(torch.isfinite(H).all()):  # the inputs overflowed inside the block
        bad = int((~torch.isfinite(H)).sum())
        raise NonFiniteError(f"{full}: its inputs on the calibration data are not finite ({bad} NaN or inf entries"
                             f" in its Hessian, of {H.numel()}): {overflow_hint(W.dtype)}")
    t0 = time.perf_counter()
    before = kernels.launches()
    try:
        res = SOLVERS[method](W, H, sparsity, spec.pattern, spec.quant, **spec.kwargs())
        if spec.refit_iters is not None and H is not None and method == spec.method:
            if spec.quant is None:
                res = refit_result(W, H, res, spec.refit_iters, res.damp_frac or spec.sweep.damp_frac)
            else:  # rounding would undo a real-valued refit: the GPTQ sweep compensates on the mask instead
                res = SOLVERS["sparsegpt"](W, H, sparsity, None, spec.quant, **spec.sweep.kwargs(), mask=res.mask)
    except CholeskyError as exc:
        raise CholeskyError(f"{full}: {exc}") from None
    except NonFiniteError as exc:
        raise NonFiniteError(f"{full}: {exc}") from None
    if not bool(torch.isfinite(res.weight).all()):  # never a NaN in an output
        bad = int((~torch.isfinite(res.weight)).sum())
        raise NonFiniteError(f"{full}: its {method} solve gave {bad} non-finite weights from finite ones, in"
                             f" {str(res.weight.dtype).removeprefix('torch.')}: {overflow_hint(res.weight.dtype)}")
    if W.device.type == "cuda":
        torch.cuda.synchronize(W.device)
    seconds = time.perf_counter() - t0
    whole_h = H is not None and H.dim() == 2  # a diagonal alone (wanda) does not give the output error
    den = output_error(W, W.new_zeros(()), H) if whole_h else 0.0
    # the sweep's own account where the weights are its fp32 result (a 16-bit model's are rounded after it)
    exact = res.obs_loss is not None and res.weight.dtype == torch.float32
    num = _sweep_error(*_swept(W, H), res) if whole_h and exact else (
        output_error(W, res.weight, H) if whole_h else 0.0)
    err = num / den if den > 0 else None
    error_seconds = time.perf_counter() - t0 - seconds
    q_err = err * res.quant_share if err is not None and res.quant_share is not None else None
    zeros = int((res.weight == 0).sum())
    if res.quant is not None and grids is not None:
        grids[full] = res.quant.to("cpu")
    set_weight(mod, res.weight)
    if res.retries:
        log.warning("%s: the damped Hessian needed %d retries; solved with damping %g x its mean diagonal",
                    full, res.retries, res.damp_frac)
    return LayerReport(
        name=full,
        shape=tuple(W.shape),
        zeros=zeros,
        sparsity=zeros / W.numel(),
        rel_error=err,
        quant_error=q_err,
        bits=stored_bits(res.quant, tuple(W.shape), W.element_size()) if res.quant is not None else None,
        damp_frac=res.damp_frac,
        retries=res.retries,
        seconds=round(seconds, 4),
        error_seconds=round(error_seconds, 4),
        hessian_of=hessian_of,
        iterations=res.iterations,
        vs_sparsegpt=num / res.warm_error if res.warm_error and whole_h else None,
        method=method,
        tokens=tokens,
        kernel="+".join(kernels.summary(before).get("obs_update", {})) or None,
    )


def _swept(W: Tensor, H: Tensor) -> tuple[Tensor, float]:
    """What the sweep solved, for ``_sweep_error``: W with dead inputs' columns zeroed, and the mean diagonal its
    damping was taken from (dead inputs' H_ii as 1)."""
    dead = dead_inputs(H)
    return prepare_weight(W, dead), float(torch.diagonal(H).float().masked_fill(dead, 1).mean())


def _sweep_error(Wp: Tensor, mean_diag: float, res) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) of a SparseGPT sweep's result from its own OBS losses, which sum to the same trace
    under the damped H it solved with: minus λ||W - Ŵ||², that is the undamped error, with no (rows x cols²)
    product (dead inputs' columns count as the sweep saw them: zero on both sides). ``Wp, mean_diag``: ``_swept``."""
    lam = res.damp_frac * mean_diag
    return max(res.obs_loss - lam * float((Wp - res.weight.float()).square().sum()), 0.0)


def compress_block(
    block_prefix: str, linears: dict[str, nn.Module], block_pass: BlockPass, spec: CompressSpec,
    grids: dict[str, QuantParams] | None = None, sparsities: dict[str, float] | None = None,
) -> tuple[list[LayerReport], str | None]:
    """Compress one block's linears; return their reports and, when the spec asked for a sequential pass
    that could not be had, why not (then the Hessians came from the dense block, as in the two-pass order).

    Sequential (``spec.sequential``): one pass, sublayer by sublayer (``sequential_block``). Two-pass:
    Hessians of every linear in one pass over the calibration data, then one solver call per linear (the
    engine then runs the block again for the next block's inputs). ``grids``, when given, receives each
    quantized linear's grid under its full name (checkpoint writers need it to store integer codes);
    ``sparsities`` overrides the spec's sparsity per full name. Experts (views named ``...experts.E....``)
    that received fewer than ``spec.min_expert_tokens`` tokens, none included, are pruned by the fallback.
    """
    solve = spec.solve

    def sparsity(name: str) -> float:
        return (sparsities or {}).get(f"{block_prefix}.{name}", spec.sparsity)

    if solve.data_free:  # no data needed: the engine's one forward
        return [solve_linear(f"{block_prefix}.{n}", m, None, solve, sparsity(n), None, grids)
                for n, m in linears.items()], None
    fallback = None
    if spec.sequential:
        fallback = block_pass.sequential_fits(linears)
        if distributed.active():  # every rank takes the same path, or the collectives would not pair up
            if any(experts.expert_of(n) is not None for n in linears):
                fallback = "torchrun: experts are reached in a different order on each rank's tokens"
            fallback = next((f for f in distributed.gather_objects(fallback) if f), None)
        if fallback is None:
            return sequential_block(block_prefix, linears, block_pass, spec, sparsity, grids), None
        log.warning("%s: two passes instead of one: %s", block_prefix, fallback)
    collector = HessianCollector(linears, hessian_dtype=spec.hessian_dtype, diagonal=solve.diagonal_only)
    with collector:
        block_pass()
    if distributed.active():
        return _compress_block_ranks(block_prefix, linears, collector, spec, sparsity, grids), fallback
    reports = []
    # how many linears still need each Hessian: it is freed after the last one's solve, so the widest
    # layer's solve does not run beside the whole block's Hessians
    uses = Counter(collector.leader[n] for n in linears if n in collector.leader)
    for name, mod in linears.items():
        if name not in collector.leader:
            if experts.expert_of(name) is not None:  # routed no token: pruned without data, reported
                reports.append(solve_linear(f"{block_prefix}.{name}", mod, None, solve, sparsity(name), None,
                                            grids, tokens=0, method=solve.fallback))
            continue  # never called on calibration data: nothing to calibrate on, left dense
        lead = collector.leader[name]
        tokens = collector.n[lead]
        few = experts.expert_of(name) is not None and tokens < spec.min_expert_tokens
        reports.append(solve_linear(f"{block_prefix}.{name}", mod, collector.hessian(name), solve, sparsity(name),
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
                          spec: CompressSpec, sparsity: Callable[[str], float],
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
            mine[name] = solve_linear(full, mod, None, spec.solve, sparsity(name), None, my_grids, tokens=0,
                                      method=spec.solve.fallback)
            continue
        lead = leader[name]
        few = experts.expert_of(name) is not None and n[lead] < spec.min_expert_tokens
        mine[name] = solve_linear(full, mod, H[lead], spec.solve, sparsity(name),
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
    sparsity: Callable[[str], float], grids: dict[str, QuantParams] | None = None,
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
        reports[name] = solve_linear(f"{block_prefix}.{name}", mod, H, spec.solve, sparsity(name),
                                     f"{block_prefix}.{lead}" if lead != name else None, grids, tokens=n,
                                     method=spec.solve.fallback if few else None)
        distributed.broadcast_(get_weight(mod), 0)  # torchrun: every rank solved it alike; rank 0's stands

    block_pass.sequential(linears, on_group)
    last.clear()
    for name, mod in linears.items():  # experts routed no token: pruned without data, reported
        if name not in reports and experts.expert_of(name) is not None:
            reports[name] = solve_linear(f"{block_prefix}.{name}", mod, None, spec.solve, sparsity(name), None,
                                         grids, tokens=0, method=spec.solve.fallback)
    return [reports[n] for n in linears if n in reports]  # linears never called: left dense


def calibration_set(tokenizer, model: nn.Module, spec: CalibSpec) -> tuple[torch.Tensor, dict]:
    """The calibration windows the spec asks for, and their description for the report."""
    if tokenizer is None:
        raise UsageError("no tokenizer to cut calibration windows with: pass --tokenizer ID_OR_DIR")
    docs, description = load_documents(spec.source, spec.split, spec.text_field)
    seqlen, bos, width = window_layout(tokenizer, spec.seqlen, context_length(model), spec.bos)
    if spec.by_document:
        windows = document_windows(docs, tokenizer, spec.nsamples, width, spec.seed, source=spec.source)
    else:
        ids = tokenize(tokenizer, joined_text(docs, tokenizer))
        windows = calibration_windows(ids, spec.nsamples, width, spec.seed, source=spec.source)
    windows = with_bos(windows, bos)
    info = {
        "source": description,
        "nsamples": spec.nsamples,
        "seqlen": seqlen,
        "seed": spec.seed,
        "bos": bos is not None,
        "by_document": spec.by_document,
        "tokens": int(windows.numel()),
        "sha256": windows_hash(windows),
    }
    return windows, info


# stacked copies of one weight that sparsegpt_levels may sweep at once (bytes of fp32)
LEVELS_BYTES = 256 << 20


def solve_levels(W: Tensor, H: Tensor, sparsities: list[float],
                 spec: SolveSpec) -> list[tuple[float, Tensor, float]]:
    """The spec's solver on one linear at each of ``sparsities`` (unstructured): [(sparsity, weights,
    relative output error ||WX - ŴX||² / ||WX||²)]. SparseGPT solves several sparsities per sweep
    (``sparsegpt_levels``, stacked up to LEVELS_BYTES) and its error comes from the sweep's own OBS losses,
    tr(D (H + λI) Dᵀ) for D = W - Ŵ, less λ||D||²: the same number ``relative_error`` gives, without one
    (rows x cols²) product per level. What SPDY's plan pass spent most of its time on (one sweep and one
    error product per level) costs about one sweep on small layers. Other solvers: one call and one error
    per sparsity."""
    if spec.method != "sparsegpt":
        solver = SOLVERS[spec.method]
        out = []
        for s in sparsities:
            res = solver(W, H, s, None, spec.quant, **spec.kwargs())
            out.append((s, res.weight, relative_error(W, res.weight, H)))
        return out
    Wp, mean_diag = _swept(W, H)  # once for every level
    den = output_error(Wp, Wp.new_zeros(()), H)
    per = max(1, LEVELS_BYTES // (W.numel() * 4))
    out = []
    for a in range(0, len(sparsities), per):
        chunk = sparsities[a : a + per]
        for s, r in zip(chunk, sparsegpt_levels(W, H, chunk, spec.quant, **spec.sweep.kwargs()), strict=True):
            num = _sweep_error(Wp, mean_diag, r)
            out.append((s, r.weight, num / den if den > 0 else 0.0))
    return out


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
    ``sparsities`` maps full linear names to sparsities.
    """
    target = alloc.target
    numel = {f"{p}.{n}": get_weight(m).numel() for p, lin in linears.items() for n, m in lin.items()}
    if reuse is not None:
        tables = reuse.get("tables")
        if not tables or {k: t["numel"] for k, t in tables.items()} != numel:
            raise UsageError("--reuse-errors: its error tables do not match this model's layers (names and"
                             " sizes): reuse a report of the same model and --skip list")
        if reuse.get("method") != "spdy" or "sparsities" not in reuse:
            raise UsageError("--reuse-errors needs the report of an --allocation spdy run (its searched"
                             " allocation): pass one, or drop --reuse-errors")
        if abs(float(reuse.get("target", -1)) - target) > 1e-9:
            raise UsageError(f"--reuse-errors: that allocation was searched for sparsity {reuse.get('target')}, not"
                             f" {target}: run the search for {target} (drop --reuse-errors)")
        return dict(reuse)

    prefixes = list(linears)
    ratios: list[float] = []
    tables: dict[str, dict] = {}
    cands = allocate.candidates(target, alloc.dp_radius)
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
            for s, weight, err in solve_levels(W, H, cands, spec.solve):
                errors[str(s)] = err
                versions[f"{full}@{s}"] = weight
            tables[full] = {"numel": W.numel(), "errors": errors}
        store.put(i, versions)

    sizes = [sum(numel[f"{p}.{n}"] for n in linears[p]) for p in prefixes]

    def owl_at(lam: float) -> dict[str, float]:
        per_block = allocate.owl(ratios, sizes, target, lam) if lam > 0 else [target] * len(prefixes)
        return {f"{p}.{n}": s for p, s in zip(prefixes, per_block, strict=True) for n in linears[p]}

    try:
        Stream(model, batched(distributed.shard(windows), batch_size), device,
               progress=progress).run(on_block, desc=f"{alloc.method} plan")
        if store is not None:  # OWL's allocations for a few λ, rounded to the grid, are further starting points
            owls = {f"owl lambda={lam:g}": allocate.snap({n: a[n] for n in tables}, tables, target)
                    for lam in allocate.owl_lambdas(alloc.dp_radius) for a in [owl_at(lam)]}
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


def _reconstruct(prefix: str, block: nn.Module, lin: dict[str, nn.Module], block_pass: BlockPass,
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


def reconstruction_summary(spec: ReconstructSpec, rebuilt: dict[str, dict], stream: Stream, n_blocks: int
                            ) -> dict:
    """The report's reconstruction entry: the spec, each block's entry, and what did not happen."""
    kept = [e for e in rebuilt.values() if not e["reverted"]]
    return {
        "spec": asdict(spec),
        "blocks": rebuilt,
        "reconstructed": len(kept),
        "reverted": [p for p, e in rebuilt.items() if e["reverted"]],
        "not_reconstructed": n_blocks - len(rebuilt),
        "dense_stream_dropped": stream.dense_dropped,
        "loss_before_mean": sum(e["loss_before"] for e in rebuilt.values()) / len(rebuilt) if rebuilt else None,
        "loss_after_mean": sum(e["loss_after"] for e in rebuilt.values()) / len(rebuilt) if rebuilt else None,
        "note": "layers[].rel_error is each linear's error as solved, before the block was reconstructed",
    }


def compress_model(
    model: nn.Module, tokenizer, run: RunSpec, windows: torch.Tensor | None = None,
    grids: dict[str, QuantParams] | None = None, reuse_errors: dict | None = None, sink=None,
    progress: Progress = True, captured: dict | None = None, calibration: dict | None = None,
) -> dict:
    """Prune (and quantize) ``model`` in place as the run's specs say; return the run report.

    ``grids``, when given, receives the quantization grid of every quantized linear by full name;
    ``reuse_errors``: the ``allocation`` entry of an earlier spdy run's report, to skip measuring the tables;
    ``sink``: a ``resume.PartialOutput`` that receives each finished block, and whose finished blocks are
    only propagated (read back compressed through the model's ``block_source``), not compressed again;
    ``progress``: a tqdm bar, nothing, or a callback (progress.py); ``captured``: block 0's inputs shared by
    runs over the same windows (engine.Stream), e.g. a sweep's cells; ``calibration``: the description of the
    ``windows`` passed in (``calibration_set``'s), for the log and the report.
    """
    t_start = time.perf_counter()
    kernels.reset()  # each run tries the Triton kernels again
    spec = run.compress
    device = distributed.device() or resolve_device(run.device)
    linears = prunable_linears(model, spec, run.output)
    keep = experts_kept(model, spec.drop_experts) if spec.drop_experts else None
    data_free = not run.needs_data
    if data_free:
        windows, calib = torch.empty(0, 0, dtype=torch.long), None
        log.info("%s: %d linears in %d blocks, no calibration data needed", run.label,
                 sum(map(len, linears.values())), len(linears))
    elif windows is None:
        windows, calib = calibration_set(tokenizer, model, run.calibration)
    elif calibration is not None:
        calib = calibration
    else:
        calib = {"source": "windows passed in", "nsamples": windows.shape[0], "seqlen": windows.shape[1],
                 "sha256": windows_hash(windows), "tokens": int(windows.numel())}
    t_calib = time.perf_counter()
    if calib is not None:
        log.info("%s: %d linears in %d blocks, calibrated on %d x %d tokens (%s)", run.label,
                 sum(map(len, linears.values())), len(linears), windows.shape[0], windows.shape[1],
                 calib["source"])
    allocation = None
    if run.allocation is not None:
        allocation = sink.allocation if sink is not None else None
        if allocation is None:
            allocation = plan_sparsities(model, windows, run.allocation, spec, linears, device,
                                         run.calibration.batch_size, reuse_errors, progress)
            if sink is not None:
                sink.set_allocation(allocation)
    t_plan = time.perf_counter()
    if distributed.active() and not data_free and windows.shape[0] < distributed.world():
        raise UsageError(f"{windows.shape[0]} calibration windows cannot be shared by {distributed.world()} torchrun"
                         f" processes: raise --nsamples to at least {distributed.world()} or launch fewer")
    rspec = run.reconstruction if spec.changes_weights else None
    stream = Stream(model, batched(distributed.shard(windows), run.calibration.batch_size), device, progress=progress,
                    captured=captured, carry_dense=rspec is not None and rspec.target == "dense")
    rebuilt: dict[str, dict] = {}  # block prefix -> its reconstruction entry
    source = getattr(model, "block_source", None)
    if sink is not None:
        if source is None:
            raise ValueError("resumable output needs a lazily loaded model (lazy.load_lazy)")
        for i in sink.finished:
            source.overrides[i] = sink.reader(i)
    prefixes = list(linears)
    layers: list[LayerReport] = []

    two_pass: dict[str, str] = {}  # blocks a sequential run had to compress in two passes, and why
    kept_peak = [0]
    dropped: dict[str, dict] = {}  # --drop-experts: experts path -> dropped indices and REAP scores
    solve = spec.changes_weights

    def on_block(i: int, block: nn.Module, block_pass: BlockPass | None) -> None:  # None: no data needed
        if sink is not None and sink.done(i):
            layers.extend(LayerReport(**r) for r in sink.layers(i))
            if grids is not None:
                grids.update(sink.grids(i))
            if rspec is not None:
                if (entry := sink.extra(i).get("reconstruct")) is not None:
                    rebuilt[prefixes[i]] = entry
                if block_pass is not None and block_pass.dense_inputs is not None:
                    block_pass.dense_outputs = dense_outputs_of_original(i, block, block_pass, source)
            return
        block_grids: dict[str, QuantParams] = {}
        if keep is not None and experts.find_experts(block):  # scored on the dense block, then dropped
            dropped.update({f"{prefixes[i]}.{k}": v for k, v in experts.reap_drop(block, block_pass, keep[2]).items()})
        reports: list[LayerReport] = []
        fallback = None
        targets = reconstruction_targets(block, linears[prefixes[i]], block_pass, rspec) if rspec else None
        if solve:  # else only dropping experts: the engine's forward feeds the next block
            with on_device(block, linears[prefixes[i]]) as lin:
                reports, fallback = compress_block(prefixes[i], lin, block_pass, spec, block_grids,
                                                   allocation["sparsities"] if allocation else None)
                if targets is not None:
                    entry = _reconstruct(prefixes[i], block, lin, block_pass, rspec, targets, reports,
                                         block_grids, masked=spec.sparsity > 0)
                    rebuilt[prefixes[i]] = entry
        few = [r for r in reports if r.method != spec.solve.method and experts.expert_of(r.name) is not None]
        if few:
            log.warning("%s: %d expert matrices got fewer than %d calibration tokens and were pruned by %s: %s",
                        prefixes[i], len(few), spec.min_expert_tokens, few[0].method,
                        ", ".join(f"{r.name.removeprefix(prefixes[i] + '.')} ({r.tokens})" for r in few[:6])
                        + (" ..." if len(few) > 6 else ""))
        if fallback is not None:
            two_pass[prefixes[i]] = fallback
        kept_peak[0] = max(kept_peak[0], block_pass.kept_peak_bytes if block_pass is not None else 0)
        layers.extend(reports)
        if grids is not None:
            grids.update(block_grids)
        if sink is not None:
            extra = {"reconstruct": rebuilt[prefixes[i]]} if prefixes[i] in rebuilt else {}
            to_write[i] = ([asdict(r) for r in reports], block_grids, extra)

    to_write: dict[int, tuple[list[dict], dict, dict]] = {}

    def write_block(i: int, block: nn.Module) -> None:
        """Journal block ``i`` once its outputs are known finite (the engine checked them)."""
        if i in to_write:
            reports, block_grids, extra = to_write.pop(i)
            sink.finish_block(i, source.checkpoint_tensors(i, block), reports, block_grids,  # the input's layout
                              extra)

    after = write_block if sink is not None else None
    if data_free:  # each block's weights on the device, nothing run through it
        stream.visit(on_block, desc=run.label, after_block=after)
    else:
        stream.run(on_block, desc=run.label, after_block=after)
    t_done = time.perf_counter()
    if keep is not None:  # the new expert count, for the saved config (every MoE layer kept as many)
        setattr(model.config, keep[0], keep[2])
        linears = {p: {n: m for n, m in lin.items() if n in block_targets(model.get_submodule(p))}
                   for p, lin in linears.items()}
    done = {r.name for r in layers}
    never = [f"{p}.{n}" for p, lin in linears.items() for n in lin if f"{p}.{n}" not in done] if solve else []
    if never:
        log.warning("%d linears were never called on the calibration data and are left dense: %s", len(never),
                    ", ".join(never[:8]) + (" ..." if len(never) > 8 else ""))
    numel = {f"{p}.{n}": get_weight(m).numel() for p, lin in linears.items() for n, m in lin.items()}
    zeros = sum(r.zeros for r in layers)
    total = sum(numel.values())  # every weight meant to be pruned: those left dense count as dense
    skipped, routers, unsupported = [], [], []
    for p in linears:
        block = model.get_submodule(p)
        routers += [f"{p}.{n}" for n in find_routers(block)]
        routers += [f"{p}.{n}" for n in experts.router_names(block) if f"{p}.{n}" not in routers]
        skipped += [f"{p}.{n}" for n in block_targets(block) if n not in linears[p]]
        unsupported += [f"{p}.{n}" for n in experts.unsupported(block)]
    if unsupported:
        log.warning("%d fused experts modules do not record their layout (no transformers experts decorator) and"
                    " are left dense: %s", len(unsupported), ", ".join(unsupported[:4]))
    moe = any(is_moe(model.get_submodule(p)) for p in linears)
    return {
        "recipe": copy.deepcopy(run.recipe),
        "device": str(device),
        "calibration": calib,
        "global_sparsity": zeros / total if total else 0.0,
        "target_sparsity": spec.sparsity,
        "pruned_params": total,
        "layers": [asdict(r) for r in layers],
        # what was left dense, and why: skipped (--skip), never called, routers, unsupported experts.
        # global_sparsity counts the never-called ones as dense; skipped layers and routers are not in it
        "left_dense": {"skipped": skipped, "never_called": never, "routers": routers,
                       "unsupported_experts": unsupported},
        "experts": (_experts_summary(layers, spec) | ({"experts_before": keep[1], "experts_after": keep[2],
                                                         "dropped": dropped} if keep else {})) if moe else None,
        "allocation": allocation,
        # linears by the implementation of their sweep's column loop (journaled per block, so a resumed run
        # counts the blocks of the run before it too); kernels that failed on the device in this process
        "kernels_used": dict(Counter(r.kernel for r in layers if r.kernel is not None)),
        "kernel_fallbacks": kernels.failures(),
        "reconstruction": reconstruction_summary(rspec, rebuilt, stream, len(prefixes)) if rspec else None,
        "sequential": {"requested": spec.sequential, "two_pass_blocks": two_pass,
                       "kept_inputs_peak_bytes": kept_peak[0],
                       "kept_on": str(stream.store)} if spec.sequential else None,
        "timings": {"calibration_s": round(t_calib - t_start, 3), "plan_s": round(t_plan - t_calib, 3),
                    "prune_s": round(t_done - t_plan, 3)},
    }


def experts_kept(model: nn.Module, drop_experts: float) -> tuple[str, int, int]:
    """(config key, experts now, experts kept) for --drop-experts, checked against the model."""
    path, blocks = find_blocks(model)
    counts = experts.kept_count(model.config, drop_experts)
    if counts is None or not any(experts.find_experts(b) for b in blocks):
        raise UsageError("--drop-experts removes experts of a mixture-of-experts model; this one has none:"
                         " drop the option")
    key, n, kept = counts
    top_k = getattr(model.config, "num_experts_per_tok", 1) or 1
    if kept == n:
        raise UsageError(f"--drop-experts {drop_experts} removes none of {n} experts: raise it to at least"
                         f" {0.5 / n:.3g}")
    if kept < top_k:
        raise UsageError(f"--drop-experts {drop_experts} keeps {kept} of {n} experts, fewer than the {top_k}"
                         f" each token is routed to: lower it to at most {(n - top_k) / n:.3g}")
    return key, n, kept


def _experts_summary(layers: list[LayerReport], spec: CompressSpec) -> dict:
    """Per-expert calibration: how many matrices, the tokens they got, and which fell back to magnitude."""
    ex = [r for r in layers if experts.expert_of(r.name) is not None]
    tokens = [r.tokens or 0 for r in ex]
    method = spec.solve.method
    return {"matrices": len(ex), "min_tokens": spec.min_expert_tokens,
            "tokens_min": min(tokens, default=0), "tokens_max": max(tokens, default=0),
            "fallback": {r.name: {"method": r.method, "tokens": r.tokens} for r in ex if r.method != method}}


def check_output_dir(out: Path, overwrite: bool, source: Path | None) -> None:
    """Refuse an --out that would lose data: the input itself, or a non-empty directory."""
    out_r = out.expanduser().resolve()
    if source is not None:
        src = source.resolve()
        if out_r == src or (src.is_file() and out_r == src.parent):
            raise UsageError(f"--out {str(out)!r} is the input model: choose a new directory")
    if out_r.exists():
        if not out_r.is_dir():
            raise UsageError(f"--out {str(out)!r} exists and is a file: choose a directory path")
        if any(out_r.iterdir()) and not overwrite:
            raise UsageError(f"--out {str(out)!r} exists and is not empty: choose another path or pass --overwrite")
