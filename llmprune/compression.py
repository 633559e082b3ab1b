"""From a run's specs to a compressed model: the calibration set, the allocation planned, every block compressed
as the streaming engine reaches it (block.py), and the run's report."""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmprune import distributed, experts, kernels
from llmprune.allocate import AllocationSpec
from llmprune.arch import find_blocks, find_routers, get_weight, is_moe
from llmprune.block import (
    CompressSpec,
    compress_block,
    dense_outputs_of_original,
    prunable_linears,
    reconstruct_solved,
    reconstruction_targets,
)
from llmprune.calibration import calibration_set
from llmprune.checkpoint import OutputSpec
from llmprune.data import (
    CalibSpec,
    batched,
    windows_hash,
)
from llmprune.engine import BlockPass, Stream, resolve_device
from llmprune.errors import UsageError
from llmprune.plan import plan_sparsities
from llmprune.progress import Progress
from llmprune.quant import QuantParams
from llmprune.reconstruct import ReconstructSpec
from llmprune.solve import LayerReport
from llmprune.targets import block_targets, on_device

log = logging.getLogger(__name__)


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
                                                   (allocation or {}).get("sparsities"),
                                                   (allocation or {}).get("bits"))
                if targets is not None:
                    entry = reconstruct_solved(prefixes[i], block, lin, block_pass, rspec, targets, reports,
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
