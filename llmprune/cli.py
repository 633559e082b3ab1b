"""Command line: parse, build a Recipe, call one function, print. Bad input exits 2 with one line."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llmprune import __version__
from llmprune.errors import CholeskyError, UsageError
from llmprune.recipe import Recipe, load_recipe, recipe_from_dict

if TYPE_CHECKING:
    import torch


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_recipe(config: str | None, **flags) -> Recipe:
    """Recipe defaults, then the YAML file, then the flags that were given (None = not given)."""
    base = load_recipe(config) if config else Recipe()
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    merged = base.to_dict() | given
    return recipe_from_dict(merged, source="options")


def _recipe_options(f):
    opts = [
        click.option("--method", type=click.Choice(["sparsegpt", "wanda", "magnitude", "rtn"]), default=None,
                     help="sparsegpt (default; with --wbits: joint pruning + GPTQ quantization in one pass), wanda,"
                          " magnitude, rtn (magnitude mask + round to nearest)."),
        click.option("--sparsity", type=float, default=None,
                     help="Fraction of each linear's weights zeroed (default 0.5, or 0 with --wbits; implied by"
                          " --pattern N:M)."),
        click.option("--pattern", default=None, help="unstructured (default) or N:M, e.g. 2:4, 4:8."),
        click.option("--calib", default=None,
                     help="wikitext2 (default), ptb, c4, shakespeare (built in), or a .txt/.jsonl file."),
        click.option("--nsamples", type=int, default=None, help="Calibration windows (default 128)."),
        click.option("--seqlen", type=int, default=None, help="Tokens per window (default 2048, capped by context)."),
        click.option("--seed", type=int, default=None, help="Seed for the calibration windows (default 0)."),
        click.option("--block-size", "--blocksize", "block_size", type=int, default=None,
                     help="Columns per lazy-update block (default 128)."),
        click.option("--damp", "--damp-frac", "damp_frac", type=float, default=None,
                     help="Hessian damping as a fraction of its mean diagonal (default 0.01)."),
        click.option("--device", default=None, help="auto (default: cuda if available), cpu, cuda, cuda:N."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None,
                     help="Compute and output dtype (default: the checkpoint's)."),
        click.option("--batch-size", type=int, default=None, help="Windows per forward pass (default 8)."),
        click.option("--hessian-dtype", type=click.Choice(["auto", "fp32"]), default=None,
                     help="auto (default): X·Xᵀ on CUDA tensor cores from 16-bit activations, fp32 accumulate."),
        click.option("--skip", multiple=True, help="Regex of linear names to keep dense (repeatable)."),
        click.option("--wbits", type=int, default=None, help="Quantize kept weights to 2..8 bits (default: no)."),
        click.option("--group-size", type=int, default=None,
                     help="Input columns per quantization scale; -1 (default) = one per output channel."),
        click.option("--sym/--asym", default=None, help="Symmetric grid (default) or asymmetric with zero points."),
        click.option("--quant-search", type=click.Choice(["minmax", "mse"]), default=None,
                     help="Grid range: minmax (default) or mse (shrink the range to minimise rounding error)."),
        click.option("--act-order", is_flag=True, default=None,
                     help="GPTQ's column order by descending Hessian diagonal (sparsegpt; not with N:M)."),
        click.option("--allocation", type=click.Choice(["uniform", "owl", "dp"]), default=None,
                     help="Per-layer sparsity under the global target: uniform (default), owl, dp."),
        click.option("--owl-m", type=float, default=None, help="OWL outlier threshold, x the mean score (default 5)."),
        click.option("--owl-lambda", type=float, default=None,
                     help="OWL: block sparsities within target ± lambda (default 0.08)."),
        click.option("--dp-radius", type=float, default=None,
                     help="dp: candidate sparsities within target ± this, in steps of 0.025 (default 0.1)."),
        click.option("--format", "format", type=click.Choice(["dense", "compressed-tensors"]), default=None,
                     help="dense (default): dequantized weights; compressed-tensors: pack-quantized ints."),
        click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default=None,
                     help="SparseGPT's block loop: auto (default; fused Triton kernel on CUDA), triton, torch."),
        click.option("--config", type=click.Path(dir_okay=False), default=None,
                     help="YAML recipe (see configs/); flags override it."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.group()
@click.version_option(__version__, prog_name="llmprune")
def cli() -> None:
    """One-shot pruning of Hugging Face causal LMs: SparseGPT, Wanda, magnitude; unstructured or N:M."""


@cli.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--lazy/--no-lazy", default=True, show_default=True,
              help="Local safetensors directories: read each block's weights when its turn comes and write each"
                   " finished block to OUT.partial/ (resumable: re-run the same command after a crash).")
@click.option("--reuse-errors", type=click.Path(), default=None,
              help="With --allocation dp: the llmprune.json (or its directory) of an earlier dp run of this model;"
                   " its error tables are reused instead of measured.")
@_recipe_options
def compress(model: str, out: str, overwrite: bool, lazy: bool, reuse_errors: str | None, config: str | None,
             **flags) -> None:
    """Prune MODEL (hub id, model directory, .gguf file, or smollm2-135m) and write a model directory."""
    recipe = build_recipe(config, **flags)
    report, _, _ = run_compress(model, Path(out), recipe, overwrite, reuse_errors, lazy)
    ckpt = report["checkpoint"]
    click.echo(
        f"compressed {len(report['layers'])} linears ({recipe.label}): {report['global_sparsity']:.2%} sparsity,"
        f" {ckpt['bits_per_weight']:.2f} bits/weight as {ckpt['format']}, in {report['timings']['total_s']:.1f} s"
        f" -> {out}"
    )
    if recipe.format == "compressed-tensors" and not recipe.sym:
        click.echo("note: vLLM reads asymmetric pack-quantized checkpoints; transformers 5.x cannot yet"
                   " (vllm-project/llm-compressor#1618): use --sym to load it there", err=True)


def read_error_tables(path: str, recipe: Recipe) -> dict:
    """The ``allocation`` entry (with error tables) of an earlier dp run's report."""
    from llmprune.checkpoint import REPORT

    p = Path(path)
    p = p / REPORT if p.is_dir() else p
    if recipe.allocation != "dp":
        raise UsageError("--reuse-errors reuses dp error tables: add --allocation dp")
    try:
        alloc = json.loads(p.read_text()).get("allocation") or {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--reuse-errors {path!r} is not a readable run report ({exc.__class__.__name__})") from None
    if not alloc.get("tables"):
        raise UsageError(f"--reuse-errors {path!r} holds no error tables: it must come from an --allocation dp run")
    return alloc


def check_kernels(mode: str, device) -> None:
    """--kernels triton where Triton cannot run is bad input, said before any work."""
    from llmprune.kernels import use_triton

    try:
        use_triton(mode, device)
    except RuntimeError as exc:
        raise UsageError(f"{exc}, or use --kernels torch") from None


def run_compress(model_ref: str, out: Path, recipe: Recipe, overwrite: bool = False, reuse_errors: str | None = None,
                 lazy: bool = True):
    """Load, prune, save atomically; return (report, pruned model, tokenizer).

    Everything a bad input can break is checked before the model is loaded. Local safetensors directories
    (dense output) go the lazy, resumable way (``run_compress_lazy``); the rest is loaded whole.
    """
    from llmprune.compress import check_output_dir, compress_model, prunable_linears, resolve_device
    from llmprune.data import load_text
    from llmprune.loading import load_model, resolve, skeleton

    t0 = time.perf_counter()
    mref = resolve(model_ref)
    check_output_dir(out, overwrite, mref.local_path)
    check_kernels(recipe.kernels, resolve_device(recipe.device))
    reuse = read_error_tables(reuse_errors, recipe) if reuse_errors else None
    load_text(recipe.calib, "train")  # fail fast on an unreachable dataset, before loading the model
    prunable_linears(skeleton(mref), recipe)  # and on a pattern some layer cannot hold
    from llmprune.lazy import can_load_lazily

    if lazy and mref.kind == "dir" and recipe.format == "dense" and can_load_lazily(Path(mref.location)):
        return run_compress_lazy(mref, out, recipe, overwrite, reuse, t0)
    model, tokenizer, _ = load_model(mref, recipe.dtype)
    load_s = time.perf_counter() - t0
    grids: dict = {}
    report = compress_model(model, tokenizer, recipe, grids=grids, reuse_errors=reuse)
    report["timings"]["load_s"] = round(load_s, 3)
    save_checkpoint(out, model, tokenizer, report, model_ref, mref.kind, t0, grids)
    return report, model, tokenizer


def run_compress_lazy(mref, out: Path, recipe: Recipe, overwrite: bool, reuse: dict | None, t0: float):
    """Compress block by block from disk into OUT.partial/ (resuming it if a run with this spec stopped), then
    publish it as ``out``."""
    import hashlib

    from llmprune.checkpoint import save_metadata, write_report
    from llmprune.compress import calibration_set, compress_model
    from llmprune.lazy import load_lazy
    from llmprune.resume import PartialOutput

    path = Path(mref.location)
    model, tokenizer = load_lazy(path, recipe.dtype)
    load_s = time.perf_counter() - t0
    windows, calib = calibration_set(tokenizer, model, recipe)
    spec = {"recipe": recipe.to_dict(), "calibration": calib["sha256"], "model": str(path),
            "config": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(), "llmprune": __version__}
    partial = PartialOutput(out, spec)
    if partial.finished:
        click.echo(f"resuming {partial.dir}: {len(partial.finished)} blocks already done", err=True)
    report = compress_model(model, tokenizer, recipe, windows=windows, reuse_errors=reuse, sink=partial)
    report["calibration"] = calib
    report["timings"]["load_s"] = round(load_s, 3)
    dtype = describe_run(report, model, mref.ref, mref.kind, lazy=True)
    rest = model.block_source.rest_state()  # the tensors outside the blocks, as the input stores them
    t_save = time.perf_counter()

    def write_meta(directory: Path) -> None:
        save_metadata(model, tokenizer, directory)
        report["checkpoint"] = dense_checkpoint_info(directory, dtype)
        report["timings"]["save_s"] = round(time.perf_counter() - t_save, 3)
        report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
        write_report(directory, report)

    partial.publish(rest, write_meta, overwrite)
    return report, model, tokenizer


def describe_run(report: dict, model, source: str, kind: str, **extra) -> torch.dtype:
    """Add the model and versions to the report; return the model's (materialised) dtype."""
    lazy_source = getattr(model, "block_source", None)  # lazy: every parameter may be on meta now
    dtype = (lazy_source.dtype if lazy_source is not None
             else next(p for p in model.parameters() if p.device.type != "meta").dtype)
    report["model"] = {"source": source, "kind": kind, "type": model.config.model_type,
                       "dtype": str(dtype).removeprefix("torch."), **extra}
    report["versions"] = _versions()
    return dtype


def dense_checkpoint_info(directory: Path, dtype) -> dict:
    return {"format": "dense", "bits_per_weight": 8 * dtype.itemsize,
            "bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors"))}


def save_checkpoint(out: Path, model, tokenizer, report: dict, source: str, kind: str,
                    t_start: float | None = None, grids: dict | None = None) -> None:
    """Complete the report (model, versions, checkpoint size, save and total time) and publish the directory
    atomically, in the recipe's format."""
    from llmprune.checkpoint import atomic_dir, save_compressed_tensors, save_hf, write_report

    dtype = describe_run(report, model, source, kind)
    recipe = report["recipe"]
    t_save = time.perf_counter()
    with atomic_dir(out) as tmp:
        if recipe["format"] == "compressed-tensors":
            report["checkpoint"] = save_compressed_tensors(model, tokenizer, tmp, report, grids or {},
                                                           act_order=recipe["act_order"])
        else:
            save_hf(model, tokenizer, tmp, report, grids=grids)
            report["checkpoint"] = dense_checkpoint_info(tmp, dtype)
        report["timings"]["save_s"] = round(time.perf_counter() - t_save, 3)
        if t_start is not None:
            report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        write_report(tmp, report)  # again, now with the checkpoint and the save time


def run_eval(model, tokenizer, dataset: str, seqlen: int, device: str, batch_size: int,
             max_windows: int | None) -> dict:
    from llmprune.compress import resolve_device
    from llmprune.data import eval_windows, load_text, tokenize
    from llmprune.evaluate import perplexity
    from llmprune.loading import context_length

    text, description = load_text(dataset, "test")
    ctx = context_length(model)
    seqlen = min(seqlen, ctx) if ctx else seqlen
    if dataset == "c4" and max_windows is None:
        max_windows = 256
    windows = eval_windows(tokenize(tokenizer, text), seqlen, dataset, max_windows)
    t0 = time.perf_counter()
    ppl = perplexity(model, windows, resolve_device(device), batch_size)
    return {"dataset": description, "seqlen": seqlen, "windows": int(windows.shape[0]), "ppl": ppl,
            "seconds": round(time.perf_counter() - t0, 3)}


@cli.command("eval-ppl")
@click.argument("model")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2, ptb, c4, shakespeare (built in, its held-out tail), or a .txt/.jsonl file.")
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many windows.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON line.")
def eval_ppl(model: str, dataset: str, seqlen: int, max_windows: int | None, device: str, dtype: str,
             batch_size: int, as_json: bool) -> None:
    """Perplexity of MODEL on a dataset (SparseGPT protocol), streamed block by block."""
    from llmprune.compress import resolve_device
    from llmprune.data import load_text
    from llmprune.loading import load_model, resolve

    if seqlen < 2:
        raise UsageError(f"--seqlen {seqlen} is too short: use at least 2 tokens")
    mref = resolve(model)
    resolve_device(device)
    load_text(dataset, "test")
    from llmprune.lazy import can_load_lazily, load_lazy

    if mref.kind == "dir" and can_load_lazily(Path(mref.location)):
        m, tok = load_lazy(Path(mref.location), dtype)  # blocks read from disk one at a time
    else:
        m, tok, _ = load_model(mref, dtype)
    result = {"model": model} | run_eval(m, tok, dataset, seqlen, device, batch_size, max_windows)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{model}: {result['dataset']} perplexity {result['ppl']:.3f} "
                   f"({result['windows']} x {result['seqlen']} tokens, {result['seconds']:.1f} s)")


def _checkpoint_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory (no config.json): pass a directory written by"
                         " `llmprune compress`")
    return p


_kernels = click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default="auto",
                        show_default=True, help="Triton kernels (auto: on CUDA) or their torch twins.")


@cli.command()
@click.argument("model")
@click.option("--pattern", required=True, help="2:4 (4:8 layers are stored as 2:4 where they also hold 2:4).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--skip-nonconforming", is_flag=True, help="Keep layers that do not hold 2:4 dense (and list them).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@_kernels
def pack(model: str, pattern: str, out: str, skip_nonconforming: bool, overwrite: bool, kernels: str) -> None:
    """Store the 2:4 linears of MODEL (a compressed checkpoint directory) as kept values + 2-bit positions."""
    from llmprune.checkpoint import atomic_dir
    from llmprune.compress import check_output_dir
    from llmprune.pack import pack_checkpoint

    src = _checkpoint_dir(model)
    check_kernels(kernels, "cpu")
    check_output_dir(Path(out), overwrite, src)
    with atomic_dir(Path(out)) as tmp:
        manifest = pack_checkpoint(src, tmp, pattern, skip_nonconforming, kernels)
    ratio = manifest["packed_bytes"] / manifest["dense_fp16_bytes"]
    click.echo(f"packed {len(manifest['layers'])} linears as 2:4: {manifest['packed_bytes']:,} bytes,"
               f" {ratio:.3f} of their dense fp16 size -> {out}")
    if manifest["dense_layers"]:
        click.echo(f"kept dense (not 2:4): {', '.join(manifest['dense_layers'])}")


@cli.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dense model directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@_kernels
def unpack(model: str, out: str, overwrite: bool, kernels: str) -> None:
    """Write a packed MODEL directory back as a dense Hugging Face model directory (exact)."""
    from llmprune.checkpoint import atomic_dir
    from llmprune.compress import check_output_dir
    from llmprune.pack import is_packed, unpack_checkpoint

    src = _checkpoint_dir(model)
    if not is_packed(src):
        raise UsageError(f"{model} is not a packed directory (no llmprune-pack.json): it is already dense")
    check_kernels(kernels, "cpu")
    check_output_dir(Path(out), overwrite, src)
    with atomic_dir(Path(out)) as tmp:
        unpack_checkpoint(src, tmp, kernels)
    click.echo(f"unpacked {model} -> {out}")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON line.")
def inspect(model: str, as_json: bool) -> None:
    """Per linear and in total: format, pattern, sparsity, bits, bytes on disk vs dense fp16."""
    from llmprune.inspect import format_table, inspect_dir

    info = inspect_dir(_checkpoint_dir(model))
    click.echo(json.dumps(info) if as_json else format_table(info))


@cli.command()
@click.option("--out", default="out/smollm2-135m-sparsegpt50", show_default=True, type=click.Path(file_okay=False))
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--max-windows", type=int, default=32, show_default=True, help="Evaluation windows.")
@click.option("--overwrite/--no-overwrite", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True)
def demo(out: str, nsamples: int, seqlen: int, max_windows: int, overwrite: bool, device: str) -> None:
    """Offline end to end: SmolLM2-135M pruned 50% by SparseGPT on Shakespeare, dense vs pruned perplexity."""
    from llmprune.compress import check_output_dir, compress_model
    from llmprune.loading import load_model

    recipe = Recipe(calib="shakespeare", nsamples=nsamples, seqlen=seqlen, device=device)
    check_output_dir(Path(out), overwrite, None)
    model, tok, _ = load_model("smollm2-135m")
    click.echo("evaluating the dense model ...")
    before = run_eval(model, tok, "shakespeare", seqlen, device, 8, max_windows)
    click.echo("pruning (SparseGPT, 50% unstructured) ...")
    report = compress_model(model, tok, recipe)
    save_checkpoint(Path(out), model, tok, report, "smollm2-135m", "builtin")
    after = run_eval(model, tok, "shakespeare", seqlen, device, 8, max_windows)
    click.echo(f"{'model':<28}{'sparsity':>10}{'perplexity':>12}")
    click.echo(f"{'SmolLM2-135M dense':<28}{0:>10.2%}{before['ppl']:>12.3f}")
    click.echo(f"{'SmolLM2-135M SparseGPT':<28}{report['global_sparsity']:>10.2%}{after['ppl']:>12.3f}")
    click.echo(f"(held-out Shakespeare, {after['windows']} x {after['seqlen']} tokens; "
               f"pruning took {report['timings']['prune_s']:.1f} s; checkpoint in {out})")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 for bad input, never a traceback."""
    try:
        cli.main(args=argv, prog_name="llmprune", standalone_mode=False)
    except (UsageError, CholeskyError) as exc:
        click.echo(f"llmprune: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("llmprune: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"llmprune: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else 2)
    sys.exit(0)
