"""The Python API: load -> compress -> save -> report, evaluation, packing. The CLI is a thin layer on it.

    import llmprune
    report = llmprune.compress("smollm2-135m", out="smollm2-50", sparsity=0.5, calib="shakespeare")
    print(report.global_sparsity, report.timings["total_s"])
    model, tokenizer = llmprune.load("smollm2-50")
    print(llmprune.evaluate(model, "shakespeare", tokenizer=tokenizer, seqlen=512)["ppl"])

``model`` is a hub id, a model directory, a ``.gguf`` file, ``smollm2-135m`` (built in), or an already loaded
``PreTrainedModel`` (compressed in place; pass its tokenizer). Options are the recipe's fields, by the same
names as the CLI flags and YAML keys; a bad one raises ``UsageError`` with the message the CLI prints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from inspect import signature
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import distributed
from llmprune.block import prunable_linears
from llmprune.checkpoint import (
    REPORT,
    atomic_dir,
    is_packed,
    read_report,
)
from llmprune.compression import RunSpec, check_output_dir
from llmprune.data import load_documents, window_layout
from llmprune.engine import resolve_device
from llmprune.errors import UsageError
from llmprune.loading import ModelRef, bf16_pays, dtype_notice, load_model, load_tokenizer, resolve, skeleton
from llmprune.pattern import parse_pattern
from llmprune.perplexity import evaluation_windows, perplexity
from llmprune.pipeline import (
    compress_run,
    describe,
    dtype_of,
    load_whole,
    one_writer,
    open_lazy,
    save_whole,
    shrink_run,
    streams,
)
from llmprune.progress import Progress, library_bars
from llmprune.recipe import Recipe, load_recipe, recipe_from_dict
from llmprune.report import Report
from llmprune.schemes import activations

log = logging.getLogger("llmprune")

__all__ = ["Recipe", "Report", "UsageError", "compress", "evaluate", "inspect", "load", "make_recipe",
           "pack", "shrink", "sweep", "unpack"]


def _bars_follow_progress(fn):
    """``progress=False`` (or a callback) also silences the bars transformers and datasets draw themselves
    (loading and writing checkpoint shards, dataset preparation): nothing of ours or theirs on stderr."""
    sig = signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        progress = sig.bind_partial(*args, **kwargs).arguments.get("progress", True)
        with library_bars(progress):
            return fn(*args, **kwargs)

    return wrapper


def make_recipe(recipe: Recipe | dict | str | Path | None = None, source: str = "options", **options: Any) -> Recipe:
    """A Recipe from defaults, then ``recipe`` (a Recipe, a dict or a YAML path), then ``options``.

    Option names are the recipe's fields (``block_size``; ``block-size`` works too). An unknown or ill-typed
    option is a UsageError naming it.
    """
    if recipe is None:
        base = Recipe()
    elif isinstance(recipe, Recipe):
        base = recipe
    elif isinstance(recipe, dict):
        base = recipe_from_dict(recipe, source="recipe")
    elif isinstance(recipe, str | Path):
        base = load_recipe(recipe)
    else:
        raise UsageError(f"recipe must be a Recipe, a dict or a YAML path, got {type(recipe).__name__}")
    if not options:
        return base
    return recipe_from_dict(base.to_dict() | options, source=source)


def read_error_tables(path: str | Path, run: RunSpec) -> dict:
    """The ``allocation`` entry (error tables and searched sparsities) of an earlier spdy run's report."""
    p = Path(path)
    p = p / REPORT if p.is_dir() else p
    if run.allocation is None or run.allocation.method != "spdy":
        raise UsageError("--reuse-errors reuses an spdy run's allocation: add --allocation spdy")
    try:
        alloc = json.loads(p.read_text()).get("allocation") or {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--reuse-errors {str(path)!r} is not a readable run report ({exc.__class__.__name__})"
                         ) from None
    if not alloc.get("tables"):
        raise UsageError(f"--reuse-errors {str(path)!r} holds no error tables: it must come from an --allocation"
                         " spdy run")
    return alloc


def check_kernels(mode: str, device: torch.device | str) -> None:
    """--kernels triton where Triton cannot run is bad input, said before any work."""
    from llmprune.kernels import use_triton

    try:
        use_triton(mode, device)
    except RuntimeError as exc:
        raise UsageError(f"{exc}, or use --kernels torch") from None


def load(model: str | Path, device: str = "cpu", dtype: str = "auto", semi_structured: bool = False,
         kernels: str = "auto", *, revision: str | None = None, trust_remote_code: bool = False):
    """(model in eval mode on ``device``, tokenizer or None) from any reference ``compress`` takes, packed 2:4
    directories included (``semi_structured``: their linears on PyTorch's sparse tensor cores, CUDA)."""
    mref = resolve(str(model), revision, trust_remote_code)
    if mref.kind == "dir" and is_packed(Path(mref.location)):
        from llmprune.pack import load as load_packed

        return load_packed(mref.location, device=device, dtype=dtype, semi_structured=semi_structured,
                           kernels=kernels)
    if semi_structured:
        raise UsageError(f"{model} is not a packed 2:4 directory: `llmprune pack` it first for semi_structured")
    loaded, tokenizer, _ = load_model(mref, dtype)
    return loaded.to(device), tokenizer


def check_not_quantized(config: dict, name: str) -> None:
    """An already quantized input (GPTQ, AWQ, FP8, compressed-tensors, bitsandbytes) has no real-valued linears
    to prune: refuse it in one line instead of compressing nothing."""
    q = config.get("quantization_config")
    if q:
        method = (q.get("quant_method") or q.get("format") or "quantized") if isinstance(q, dict) else "quantized"
        raise UsageError(f"{name} is already quantized ({method}): compress its unquantized original (the dense"
                         " bf16/fp16 checkpoint), or dequantize it first")


def _tokenizer_arg(tokenizer, mref: ModelRef | None = None):
    """A tokenizer given as an object, or as a hub id / directory (``--tokenizer``), loaded."""
    if tokenizer is None or not isinstance(tokenizer, str | Path):
        return tokenizer
    tok = load_tokenizer(str(tokenizer), **({"revision": mref.revision} if mref and mref.revision else {}))
    if tok is None:
        raise UsageError(f"--tokenizer {str(tokenizer)!r} is not a tokenizer directory or a reachable hub id")
    return tok


def _tokenizer_for(model: nn.Module, tokenizer, required: bool = True):
    """The tokenizer given, else the one saved beside the model's weights (its ``name_or_path``); None when
    there is none and the run needs no data."""
    if tokenizer is not None:
        return _tokenizer_arg(tokenizer)
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    tok = load_tokenizer(name) if name else None  # None: not found offline, not a tokenizer directory
    if tok is not None or not required:
        return tok
    raise UsageError("an in-memory model needs its tokenizer: pass tokenizer=... (the one it was loaded with)")


@_bars_follow_progress
def compress(
    model: str | Path | nn.Module,
    out: str | Path | None = None,
    recipe: Recipe | dict | str | Path | None = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
    lazy: bool = True,
    reuse_errors: str | Path | None = None,
    progress: Progress = True,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dist_read: str = "all",
    **options: Any,
) -> Report:
    """Compress ``model`` as the recipe (and ``options``, which override it) says; return the run report.

    With ``out``, a model directory is written there atomically (the input is never modified); a local
    safetensors directory with dense output is streamed block by block from disk and resumable (``lazy``).
    An in-memory model is compressed in place; without ``out`` nothing is written and the compressed model
    is ``report.module``. ``reuse_errors``: an earlier spdy run's report (or its directory). ``progress``:
    True (a tqdm bar), False, or ``fn(task, done, total)``. ``tokenizer``: an object, or a hub id /
    directory to load one from (a model directory without tokenizer files needs it). ``revision`` and
    ``trust_remote_code`` go to transformers' loaders. ``dist_read`` (under torchrun, streamed models): "all"
    (every rank reads each block from the shards) or "rank0" (rank 0 reads it and broadcasts it).
    """
    t0 = time.perf_counter()
    _check_dist_read(dist_read)
    run = make_recipe(recipe, source="compress()", **options).resolve()
    check_kernels(run.compress.solve.sweep.kernels, resolve_device(run.device))
    reuse = read_error_tables(reuse_errors, run) if reuse_errors is not None else None
    mref, out_path, tokenizer = _checked_input(model, out, overwrite, run, tokenizer, revision, trust_remote_code,
                                               lambda m: prunable_linears(m, run.compress, run.output))
    return compress_run(model if mref is None else None, mref, out_path, run, tokenizer=tokenizer, lazy=lazy,
                        overwrite=overwrite, reuse=reuse, progress=progress, t0=t0, dist_read=dist_read)


def _checked_input(model, out, overwrite: bool, run: RunSpec, tokenizer, revision: str | None,
                   trust_remote_code: bool, check) -> tuple[ModelRef | None, Path | None, Any]:
    """What compress and shrink check before any weight is read: where the model is (None: in memory), an
    --out that loses nothing, reachable calibration data, the tokenizer (an object or a reference), an input
    that is not already quantized, and ``check(model or its weightless skeleton)`` (the shapes the run needs).
    Returns (model reference, out path, tokenizer)."""
    out_path = Path(out) if out is not None else None
    mref = None if isinstance(model, nn.Module) else resolve(str(model), revision, trust_remote_code)
    if out_path is not None:
        check_output_dir(out_path, overwrite, None if mref is None else mref.local_path)
    calib = run.calibration
    if run.needs_data:  # an unreachable dataset fails before the model loads
        load_documents(calib.source, calib.split, calib.text_field)
    tokenizer = _tokenizer_arg(tokenizer, mref)
    if calib.bos and run.needs_data:
        _check_bos(tokenizer, mref)
    if mref is None:
        tokenizer = _tokenizer_for(model, tokenizer, required=run.needs_data)
        check_not_quantized(model.config.to_dict(), "the model")
        check(model)
    else:
        shape = skeleton(mref)
        if mref.kind in ("dir", "hub"):  # gguf files are dequantized by transformers on load
            check_not_quantized(shape.config.to_dict(), mref.ref)
        check(shape)
    return mref, out_path, tokenizer


def _check_bos(tokenizer, mref: ModelRef | None) -> None:
    """--bos with a tokenizer that adds no BOS is refused before the model loads (the windows need one)."""
    if tokenizer is None and mref is not None and mref.kind == "dir":
        tokenizer = load_tokenizer(mref.location, **mref.kwargs)
    if tokenizer is not None:  # else: the model's own, checked when the windows are cut
        window_layout(tokenizer, 2, None, True)


@_bars_follow_progress
def evaluate(
    model: str | Path | nn.Module,
    dataset: str = "wikitext2",
    *,
    tokenizer=None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 4,
    split: str | None = None,
    text_field: str = "text",
    bos: bool | None = None,
    progress: Progress = True,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dist_read: str = "all",
) -> dict[str, Any]:
    """Perplexity by the SparseGPT protocol, streamed block by block (from disk for safetensors directories).

    ``split``: the dataset's (default: its test split; a local file: all of it, or train/test). ``bos``: start
    every window with BOS (default: when the tokenizer adds one). Returns {"dataset", "seqlen" (capped by the
    model's context), "windows", "bos", "ppl", "seconds"}.
    """
    if seqlen < 2:
        raise UsageError(f"--seqlen {seqlen} is too short: use at least 2 tokens")
    _check_dist_read(dist_read)
    dev = distributed.device() or resolve_device(device)
    # a missing model is named first (resolve reads no weights), then unreachable data fails before the load
    mref = None if isinstance(model, nn.Module) else resolve(str(model), revision, trust_remote_code)
    _, description = load_documents(dataset, split, text_field, "eval")
    if bos:
        _check_bos(_tokenizer_arg(tokenizer, mref), mref)
    if mref is None:
        m, tok = model, _tokenizer_for(model, tokenizer)
    else:
        if streams(mref):  # blocks read from disk one at a time
            m, tok, _ = open_lazy(mref, dtype, read_on_main=dist_read == "rank0", writes=False)
        else:
            m, tok = load_whole(mref, dtype)
        dtype_notice(dtype_of(m), dtype, dev, writes=False)
        tok = _tokenizer_arg(tokenizer, mref) if tokenizer is not None else tok
        if tok is None:
            raise UsageError(f"{model} has no tokenizer files: pass --tokenizer ID_OR_DIR (tokenizer=...)")
        _warn_if_calibrated_on(mref, description)
        _quantize_activations_as_declared(m, mref)
    windows, info = evaluation_windows(tok, m, dataset, seqlen, max_windows, split, text_field, bos)
    t0 = time.perf_counter()
    ppl = perplexity(m, windows, dev, batch_size, progress=progress)
    return info | {"windows": int(windows.shape[0]), "ppl": ppl, "seconds": round(time.perf_counter() - t0, 3)}


def _check_dist_read(dist_read: str) -> None:
    if dist_read not in ("all", "rank0"):
        raise UsageError(f"unknown dist_read {dist_read!r}: choose all (every rank reads the shards) or rank0"
                         " (rank 0 reads, the others receive)")


def _quantize_activations_as_declared(m: nn.Module, mref: ModelRef) -> None:
    """A dense llmprune output of a scheme with quantized activations (W8A8, FP8_DYNAMIC, MXFP4, ...): its
    linears' inputs are fake-quantized as the scheme declares, so the perplexity is the one a runtime sees
    (a compressed-tensors directory is quantized by transformers itself, from its config)."""
    report = read_report(Path(mref.location)) if mref.kind == "dir" else None
    act = activations(((report or {}).get("recipe") or {}).get("scheme"))
    if act is None or json.loads((Path(mref.location) / "config.json").read_text()).get("quantization_config"):
        return
    from llmprune.quant import quantize_inputs

    quantize_inputs(m, [layer["name"] for layer in report.get("layers", [])], act)
    log.info("inputs of %d linears fake-quantized as %s declares (%s)", len(report.get("layers", [])),
             report["recipe"]["scheme"], act.label)


def _warn_if_calibrated_on(mref: ModelRef, description: str) -> None:
    """A local evaluation file that overlaps the model's own calibration text measures the calibration fit."""
    report = read_report(Path(mref.location)) if mref.kind == "dir" else None
    calib = ((report or {}).get("calibration") or {}).get("source", "")
    if not (calib.startswith("file:") and description.startswith("file:")):
        return
    path_c, _, split_c = calib.removeprefix("file:").partition(":")
    path_e, _, split_e = description.removeprefix("file:").partition(":")
    disjoint = {split_c, split_e} == {"train", "test"}
    if path_c == path_e and not disjoint:
        log.warning("evaluating on %s, which this model was calibrated on (%s): the perplexity measures the"
                    " calibration fit; evaluate on held-out text (--split test after calibrating with --split"
                    " train)", path_e, calib)


def _model_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory (no config.json): pass a directory written by"
                         " `llmprune compress`")
    return p


@_bars_follow_progress
def pack(model: str | Path, out: str | Path, pattern: str = "2:4", *, skip_nonconforming: bool = False,
         overwrite: bool = False, kernels: str = "auto", device: str = "auto", progress: Progress = True) -> dict:
    """Store the 2:4 linears of a compressed checkpoint directory as kept values + 2-bit positions; return
    the manifest (``pack.py`` documents the layout). ``device``: where each layer is packed (auto: CUDA,
    where the Triton kernels run, when available)."""
    from llmprune.pack import pack_checkpoint

    src = _model_dir(model)
    dev = resolve_device(device)
    check_kernels(kernels, dev)
    check_output_dir(Path(out), overwrite, src)
    with one_writer(Path(out)), atomic_dir(Path(out)) as tmp:
        manifest = pack_checkpoint(src, tmp, pattern, skip_nonconforming, kernels, str(dev), progress=progress)
    return manifest


def unpack(model: str | Path, out: str | Path, *, overwrite: bool = False, kernels: str = "auto",
           device: str = "auto") -> None:
    """Write a packed directory back as a dense Hugging Face model directory (exact)."""
    from llmprune.pack import unpack_checkpoint

    src = _model_dir(model)
    if not is_packed(src):
        raise UsageError(f"{model} is not a packed directory (no llmprune-pack.json): it is already dense")
    dev = resolve_device(device)
    check_kernels(kernels, dev)
    check_output_dir(Path(out), overwrite, src)
    with one_writer(Path(out)), atomic_dir(Path(out)) as tmp:
        unpack_checkpoint(src, tmp, kernels, str(dev))


def inspect(model: str | Path) -> dict:
    """Per linear and in total: format, pattern, sparsity, bits, bytes on disk vs dense fp16."""
    from llmprune.checkpoint_info import inspect_dir

    return inspect_dir(_model_dir(model))


@_bars_follow_progress
def sweep(
    model: str | Path | nn.Module,
    out: str | Path,
    *,
    methods: str | list[str],
    sparsities: str | list,
    wbits: str | list | None = None,
    evals: str | list[str] = "wikitext2",
    recipe: Recipe | dict | str | Path | None = None,
    tokenizer=None,
    eval_seqlen: int | None = None,
    max_windows: int | None = None,
    keep_checkpoints: bool = False,
    tasks: str | list[str] | None = None,
    progress: Progress = True,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **options: Any,
) -> list[dict]:
    """Methods × sparsities (× ``wbits``, e.g. "none,4") on one calibration set, each cell evaluated on the
    same windows of every ``evals`` dataset; rows (dense first) also written to ``out`` as results.csv,
    results.json, results.md and ppl_vs_sparsity.png. Resumable: finished cells are kept in ``out/cells``.
    ``options``/``recipe``: the shared recipe (calibration, damping, ...); the grid sets method, sparsity,
    pattern and bits. ``tasks``: lm-eval zero-shot tasks, by name or as task YAML files (needs ``lm-eval``)."""
    from llmprune import sweeps

    grid_keys = {"method", "sparsity", "pattern", "wbits"} & set(options)
    if grid_keys:
        raise UsageError(f"a sweep sets {', '.join(sorted(grid_keys))} from its grid: use --methods, --sparsities"
                         " and --wbits instead")
    base = make_recipe(recipe, source="sweep()", **options)
    # every cell's recipe is valid, before any data or model is read
    cells = [(cell, _cell_recipe(cell, base).resolve()) for cell in sweeps.grid(methods, sparsities, wbits)]
    run = base.resolve()
    mref = None if isinstance(model, nn.Module) else resolve(str(model), revision, trust_remote_code)  # named first
    eval_names, task_names, out_path = _checked_sweep(run, out, evals, tasks)
    if mref is None:
        m, tok, name = model, _tokenizer_for(model, tokenizer), getattr(model, "name_or_path", "") or "in-memory"
    else:
        m, tok = load_whole(mref, run.dtype, writes=bf16_pays(run.device))  # the dtype compress would write
        tok = _tokenizer_arg(tokenizer, mref) if tokenizer is not None else tok
        name = mref.ref
    out_path.mkdir(parents=True, exist_ok=True)

    def save(cell, compressed: nn.Module, report: dict) -> None:
        slug = cell.label.replace(" ", "-").replace(":", "of")
        describe(report, compressed, name, "sweep")
        save_whole(out_path / "checkpoints" / slug, compressed, tok, report, {}, time.perf_counter(), run.output)

    def after(cell, compressed: nn.Module) -> dict:
        return sweeps.zero_shot(compressed, tok, task_names) if task_names else {}

    from llmprune.resume import sole_writer

    with sole_writer(out_path, f"sweep --out {out_path}"):  # one writer of its cells, tables and checkpoints
        return sweeps.run_sweep(m, tok, run, cells, eval_names, out_path, model_name=name,
                                eval_seqlen=eval_seqlen, max_windows=max_windows,
                                save=save if keep_checkpoints else None, extra=after if task_names else None,
                                extra_key=task_names or None, progress=progress)


def _checked_sweep(run: RunSpec, out: str | Path, evals, tasks) -> tuple[list[str], list[str], Path]:
    """What a sweep checks before reading the model: every evaluation set and the calibration set reachable, an
    --out that is not a file, lm-eval and its task files. Returns (evaluation sets, tasks, out path)."""
    from llmprune import sweeps

    eval_names, task_names = sweeps._split(evals), sweeps._split(tasks)
    for name in eval_names:
        load_documents(name, None, "text", "eval")
    load_documents(run.calibration.source, run.calibration.split, run.calibration.text_field)
    out_path = Path(out).expanduser()
    if out_path.exists() and not out_path.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is a file: choose a directory path")
    if task_names:
        sweeps.check_lm_eval()
        for task in task_names:
            sweeps.task_name(task)  # a task file that is missing or names no task, before any work
    return eval_names, task_names, out_path


def _cell_recipe(cell, base: Recipe) -> Recipe:
    """A sweep cell's recipe: the shared one with the cell's method, sparsity or pattern, and bits."""
    pattern = parse_pattern(cell.sparsity) if ":" in cell.sparsity else None
    try:
        return base.replace(method=cell.method, wbits=cell.wbits, pattern=str(pattern) if pattern else "unstructured",
                            sparsity=None if pattern else float(cell.sparsity))
    except UsageError as exc:
        raise UsageError(f"sweep cell '{cell.label}': {exc}") from None


@_bars_follow_progress
def shrink(
    model: str | Path | nn.Module,
    out: str | Path | None = None,
    recipe: Recipe | dict | str | Path | None = None,
    *,
    mlp: float = 0.0,
    heads: float = 0.0,
    drop_blocks: int = 0,
    method: str = "obs",
    align: int = 64,
    drop_experts: float = 0.0,
    tokenizer=None,
    overwrite: bool = False,
    lazy: bool = True,
    progress: Progress = True,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **options: Any,
) -> dict:
    """Structured pruning: remove a fraction of every block's MLP channels (``mlp``) and attention heads
    (``heads``), ``drop_blocks`` whole blocks and, in a mixture of experts, ``drop_experts`` of each layer's
    experts (REAP), choosing by ``method`` (obs, l1, wanda) on the calibration
    data of ``recipe``/``options``; write a standard, smaller model directory to ``out`` (or shrink an
    in-memory model in place); ``wbits`` in the recipe quantizes the shrunk model in the same run. A
    safetensors directory is streamed from disk (``lazy``) unless ``lazy=False``. Returns the run report (also
    ``out/llmprune.json``)."""
    from llmprune.shrinking import ShrinkSpec, plan

    t0 = time.perf_counter()
    spec = ShrinkSpec(mlp=mlp, heads=heads, drop_blocks=drop_blocks, method=method, align=align,
                      drop_experts=drop_experts)
    rec = make_recipe(recipe, source="shrink()", **options)
    pruning = [f for f, on in (("sparsity", rec.sparsity not in (None, 0)), ("pattern", rec.nm is not None),
                               ("allocation", rec.allocation != "uniform")) if on]
    if pruning:
        raise UsageError(f"shrink removes whole channels, heads and blocks; {', '.join(pruning)} in the recipe prunes"
                         " inside layers: drop it, or run `llmprune compress` on the shrunk model")
    if not drop_experts and rec.drop_experts:  # given in the recipe
        spec = dataclasses.replace(spec, drop_experts=rec.drop_experts)
    def check(m: nn.Module) -> None:
        p = plan(m, spec)
        if rec.wbits is not None and rec.group_size > 0 and p.layout is not None:  # the widths after shrinking
            heads = p.heads - (p.remove_per_group * p.kv_heads or p.whole_groups)
            widths = {"MLP channels": p.keep_channels, "attention inputs (heads x head_dim)": heads * p.head_dim,
                      "hidden size": m.config.hidden_size}
            for what, cols in widths.items():
                if cols % rec.group_size:
                    raise UsageError(f"--group-size {rec.group_size} does not divide the shrunk model's {cols} {what}:"
                                     f" pick a divisor of {cols}, -1 for per-channel, or another --align")

    run = rec.resolve()
    # --wbits: then quantized (GPTQ, or the recipe's method at sparsity 0) in the same run
    quantize = _quantizing(rec).resolve() if rec.wbits is not None else None
    mref, out_path, tokenizer = _checked_input(model, out, overwrite, run, tokenizer, revision, trust_remote_code,
                                               check)
    return shrink_run(model if mref is None else None, mref, out_path, run, quantize, spec, tokenizer=tokenizer,
                      lazy=lazy, overwrite=overwrite, progress=progress, t0=t0)


def _quantizing(recipe: Recipe) -> Recipe:
    """The recipe of ``--wbits`` after a shrink: quantization only (the shrink already dropped the experts)."""
    return recipe.replace(sparsity=0.0, drop_experts=0.0)


