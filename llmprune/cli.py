"""Command line: parse, build a Recipe, call one API function (api.py), print. Bad input exits 2 with one line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import click

from llmprune import signals
from llmprune.errors import CholeskyError, UsageError
from llmprune.recipe import HESSIAN_DTYPES, METHODS, RECONSTRUCT_STEPS, Recipe, load_recipe, recipe_from_dict
from llmprune.version import __version__

log = logging.getLogger("llmprune")


def build_recipe(config: str | None, **flags) -> Recipe:
    """Recipe defaults, then the YAML file, then the flags that were given (None = not given)."""
    base = load_recipe(config) if config else Recipe()
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    merged = base.to_dict() | given
    return recipe_from_dict(merged, source="options")


class OwlLambda(click.ParamType):
    """--owl-lambda: a number, or ``auto``."""

    name = "LAMBDA|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor auto: pass e.g. --owl-lambda 0.08", param, ctx)


class BitsChoices(click.ParamType):
    """--bits-choices: comma-separated bit-widths."""

    name = "B,B,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a list of bit-widths: pass e.g. --bits-choices 2,3,4,8", param, ctx)


def _log_to_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--log-file: the library's log (INFO and up, with times) appended to a file, beside the terminal's."""
    if value:
        handler = logging.FileHandler(value, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        ctx.call_on_close(lambda: (log.removeHandler(handler), handler.close()))


def _model_options(f):
    """How to read MODEL: its tokenizer from elsewhere, a hub revision, its own code."""
    f = click.option("--trust-remote-code", is_flag=True,
                     help="Run the model's own modelling code (off by default: only for sources you trust).")(f)
    f = click.option("--revision", default=None, help="Hub ids: the branch, tag or commit to read.")(f)
    f = click.option("--tokenizer", default=None,
                     help="A tokenizer directory or hub id, for models saved without one.")(f)
    return f


_dist_read = click.option(
    "--dist-read", type=click.Choice(["all", "rank0"]), default="all", show_default=True,
    help="Under torchrun, for models streamed from disk: every rank reads each block from the shards (all; they"
         " must be on a file system every node sees) or rank 0 reads it and broadcasts it (rank0).")

_log_file = click.option("--log-file", type=click.Path(dir_okay=False), expose_value=False, is_eager=True,
                         callback=_log_to_file, help="Also write the log (INFO and up) to this file.")


def _recipe_options(f=None, *, exclude: tuple[str, ...] = ()):
    """Every recipe field as an option (``exclude``: flags a command sets otherwise, e.g. a sweep's grid)."""
    if f is None:
        return lambda g: _recipe_options(g, exclude=exclude)
    opts = [
        click.option("--method", type=click.Choice(list(METHODS)), default=None,
                     help="sparsegpt (default; with --wbits: joint pruning + GPTQ quantization in one pass), wanda,"
                          " magnitude, rtn (magnitude mask + round to nearest), admm (mask and weights searched"
                          " together, from SparseGPT's answer), obc (exact per-row greedy OBS; small layers)."),
        click.option("--sparsity", type=float, default=None,
                     help="Fraction of each linear's weights zeroed (default 0.5, or 0 with --wbits; implied by"
                          " --pattern N:M)."),
        click.option("--pattern", default=None, help="unstructured (default) or N:M, e.g. 2:4, 4:8."),
        click.option("--wbits", type=int, default=None, help="Quantize kept weights to 2..8 bits (default: no)."),
        click.option("--group-size", type=int, default=None,
                     help="Input columns per quantization scale; -1 (default) = one per output channel."),
        click.option("--calib", default=None,
                     help="wikitext2 (default), ptb, c4, shakespeare (built in), hf:NAME[:CONFIG], or a"
                          " .txt/.jsonl/.json/.parquet file."),
        click.option("--split", default=None,
                     help="Calibration split: the dataset's (default train); local files: all (default), train"
                          " (first 90%), test (last 10%)."),
        click.option("--text-field", default=None, help="The rows' text field (default text; 'messages' chats are"
                                                          " rendered with the chat template)."),
        click.option("--by-document/--joined", default=None,
                     help="Each window from one random document (default for c4), or cut from the text joined."),
        click.option("--bos/--no-bos", default=None,
                     help="Start every window with BOS (default: when the tokenizer adds one)."),
        click.option("--nsamples", type=int, default=None, help="Calibration windows (default 128)."),
        click.option("--seqlen", type=int, default=None, help="Tokens per window (default 2048, capped by context)."),
        click.option("--seed", type=int, default=None, help="Seed for the calibration windows (default 0)."),
        click.option("--block-size", "--blocksize", "block_size", type=int, default=None,
                     help="Columns per lazy-update block (default 128)."),
        click.option("--damp", "--damp-frac", "damp_frac", type=float, default=None,
                     help="Hessian damping as a fraction of its mean diagonal (default 0.01)."),
        click.option("--device", default=None, help="auto (default: cuda if available), cpu, cuda, cuda:N."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None,
                     help="Compute and output dtype (default: the checkpoint's; bfloat16 for float32 ones and .gguf"
                          " where bf16 arithmetic is native: a GPU, an AVX-512 BF16/AMX CPU)."),
        click.option("--batch-size", type=int, default=None, help="Windows per forward pass (default 8)."),
        click.option("--hessian-dtype", type=click.Choice(list(HESSIAN_DTYPES)), default=None,
                     help="auto (default): X·Xᵀ on CUDA tensor cores from 16-bit activations, fp32 accumulate;"
                          " fp64: accumulate in fp64, so torchrun's output hardly depends on the rank count"
                          " (docs/torchrun.md)."),
        click.option("--skip", multiple=True, help="Regex of linear names to keep dense (repeatable)."),
        click.option("--sym/--asym", default=None, help="Symmetric grid (default) or asymmetric with zero points."),
        click.option("--quant-search", type=click.Choice(["minmax", "mse"]), default=None,
                     help="Grid range: minmax (default) or mse (shrink the range to minimise rounding error)."),
        click.option("--grid", type=click.Choice(["int", "fp8", "nvfp4", "mxfp4"]), default=None,
                     help="Weight grid: int (default), fp8 (E4M3, --wbits 8; --group-size 0 = per tensor), nvfp4"
                          " (E2M1, FP8 scale per 16), mxfp4 (E2M1, power-of-two scale per 32); docs/formats.md."),
        click.option("--scheme", default=None, metavar="NAME",
                     help="llm-compressor preset: W4A16, W8A16, W4A16_ASYM, W8A8, W4AFP8, FP8_DYNAMIC, NVFP4A16,"
                          " MXFP4A16, MXFP4, ... (sets --wbits, --grid, --group-size and activation quantization)."),
        click.option("--act-order", is_flag=True, default=None,
                     help="GPTQ's column order by descending Hessian diagonal (sparsegpt; not with N:M)."),
        click.option("--allocation", type=click.Choice(["uniform", "owl", "spdy"]), default=None,
                     help="Per-layer sparsity under the global target: uniform (default), owl, spdy (a dynamic"
                          " program over layer errors, sensitivities searched on the calibration loss)."),
        click.option("--bits-choices", type=BitsChoices(), default=None, metavar="B,B,...",
                     help="With --allocation spdy: search a bit-width per layer among these (e.g. 2,3,4,8) with"
                          " --wbits the average bits per weight not to exceed; written as compressed-tensors"
                          " mixed-precision."),
        click.option("--owl-m", type=float, default=None, help="OWL outlier threshold, x the mean score (default 5)."),
        click.option("--owl-lambda", type=OwlLambda(), default=None,
                     help="OWL: block sparsities within target ± lambda (default 0.08); auto: the lambda whose"
                          " allocation has the lowest calibration loss (0 = uniform included)."),
        click.option("--spdy-radius", type=float, default=None,
                     help="spdy: candidate sparsities within target ± this, in steps of 0.025 (default 0.1)."),
        click.option("--spdy-steps", type=int, default=None,
                     help="spdy: candidate allocations scored in the search (default 24)."),
        click.option("--spdy-samples", type=int, default=None,
                     help="spdy: calibration windows each candidate is scored on (default 4)."),
        click.option("--owl-samples", type=int, default=None,
                     help="--owl-lambda auto: calibration windows each lambda's trial compresses and is scored on"
                          " (default 8)."),
        click.option("--format", "format", type=click.Choice(["dense", "compressed-tensors"]), default=None,
                     help="dense (default): dequantized weights; compressed-tensors: pack-quantized ints."),
        click.option("--refit/--no-refit", default=None,
                     help="Re-solve the kept weights of the method's mask (PCG; never raises a layer's error)."),
        click.option("--refit-iters", type=int, default=None, help="PCG steps of --refit (default 20)."),
        click.option("--admm-refit-iters", type=int, default=None,
                     help=f"admm: PCG steps of its refit on the support found (default {Recipe.admm_refit_iters})."),
        click.option("--admm-iters", type=int, default=None,
                     help=f"admm: at most this many iterations (default {Recipe.admm_iters})."),
        click.option("--admm-rho0", type=float, default=None,
                     help=f"admm: first penalty, on the problem scaled to a unit Hessian diagonal"
                          f" (default {Recipe.admm_rho0})."),
        click.option("--admm-rho-growth", type=float, default=None,
                     help=f"admm: penalty factor per check (every 3 iterations) while over 10% of the support moves,"
                          f" smaller steps as it settles (default {Recipe.admm_rho_growth})."),
        click.option("--obc-max-cols", type=int, default=None,
                     help="obc: refuse layers with more inputs than this (default 1024)."),
        click.option("--min-expert-tokens", type=int, default=None,
                     help="MoE: an expert routed fewer calibration tokens than this is pruned by magnitude, and"
                          " named in the report (default 64)."),
        click.option("--drop-experts", type=float, default=None,
                     help="MoE: remove this fraction of each layer's experts, those with the lowest"
                          " router-weighted output norm on the calibration tokens (REAP), and their router rows."),
        click.option("--sequential/--two-pass", default=None,
                     help="sequential (default): each block compressed sublayer by sublayer in data-flow order, in"
                          " one forward; two-pass: every Hessian from the dense block, then a second forward."),
        click.option("--reconstruct", type=int, default=None, is_flag=False, flag_value=RECONSTRUCT_STEPS,
                     metavar="[STEPS]",
                     help="After each block's linears are solved, train their kept weights STEPS Adam steps"
                          f" (alone: {RECONSTRUCT_STEPS}; one batch of --batch-size windows each) toward the"
                          " block's dense output; masks fixed, quantized weights on their grid (default: off)."),
        click.option("--reconstruct-lr", type=float, default=None,
                     help=f"--reconstruct: learning rate on the weights (default {Recipe.reconstruct_lr:g};"
                          " quantized weights keep their codes and their scales train)."),
        click.option("--reconstruct-target", type=click.Choice(["dense", "compressed"]), default=None,
                     help="--reconstruct: dense (default): the dense model's output, its stream carried beside;"
                          " compressed: the dense block on the compressed stream (one stream)."),
        click.option("--reconstruct-granularity", type=click.Choice(["block", "sublayer"]), default=None,
                     help="--reconstruct: block (default) or sublayer (attention on its own output, then the"
                          " rest on the block's)."),
        click.option("--reconstruct-norms/--no-reconstruct-norms", default=None,
                     help="--reconstruct: also train norm weights and biases (default no)."),
        click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default=None,
                     help="SparseGPT's block loop: auto (default; fused Triton kernel on CUDA), triton, torch."),
        click.option("--config", type=click.Path(dir_okay=False), default=None,
                     help="YAML recipe (see configs/); flags override it."),
    ]
    for opt in reversed(opts):
        probe = opt(lambda: None)  # the option's own names, to leave out the excluded ones
        if not set(probe.__click_params__[0].opts) & set(exclude):
            f = opt(f)
    return f


# the options most runs set, listed first in every command's help, and the rarely used ones, listed last; the
# rest follow in definition order
COMMON = ("out", "method", "methods", "sparsity", "sparsities", "pattern", "mlp", "heads", "drop_blocks",
          "shrink_method", "scheme", "wbits", "grid_wbits", "grid", "group_size", "dataset", "calib", "evals",
          "nsamples", "seqlen", "max_windows", "device", "dtype", "overwrite", "config")
LATE = ("lazy", "reuse_errors", "kernels", "dist_read", "log_file")


class _Command(click.Command):
    """A command whose help lists the common options (``COMMON``) first and the rare ones (``LATE``) last; its
    examples are the epilog."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        rank = {name: i for i, name in enumerate(COMMON)} | {name: 100 + i for i, name in enumerate(LATE)}
        params = super().get_params(ctx)  # the help option last
        return sorted(params, key=lambda p: 200 if "--help" in getattr(p, "opts", ()) else
                      rank.get(p.name or "", len(COMMON)))


class _Group(click.Group):
    """Commands listed in the order they are defined (the workflow's), not alphabetically."""

    command_class = _Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Group, epilog="""\b
Start with `llmprune demo` (offline, about 5 minutes on 2 CPU cores). Examples:
  llmprune compress smollm2-135m --out sm-50 --calib shakespeare --nsamples 32 --seqlen 512
  llmprune eval-ppl sm-50 --dataset shakespeare --seqlen 512
  llmprune COMMAND --help      (each command's options and examples)""")
@click.version_option(__version__, prog_name="llmprune")
def cli() -> None:
    """One-shot compression of Hugging Face causal LMs, streamed one decoder block at a time: pruning (SparseGPT,
    Wanda, magnitude, ADMM; unstructured or N:M such as 2:4), 2-8 bit quantization (GPTQ, round to nearest),
    structured shrinking, and the tools around them: perplexity, sweeps, 2:4 packing, inspection, speed."""


def _echo_reconstruction(rec: dict | None, what: str = "") -> None:
    """The summary line of --reconstruct: what was reconstructed, the mean block loss, what was not."""
    if rec is None:
        return
    blocks = rec["reconstructed"] + len(rec["reverted"]) + rec["not_reconstructed"]
    click.echo(f"reconstructed{what} {rec['reconstructed']} of {blocks} blocks"
               f" ({rec['spec']['steps']} steps each, target {rec['spec']['target']})"
               + (f": block loss {rec['loss_before_mean']:.4g} -> {rec['loss_after_mean']:.4g} on average"
                  if rec["loss_before_mean"] is not None else "")
               + (f"; {len(rec['reverted'])} kept as solved (training did not lower their loss)"
                  if rec["reverted"] else "")
               + (f"; dense stream dropped: {rec['dense_stream_dropped']}" if rec["dense_stream_dropped"] else ""))


@cli.command(short_help="Prune and/or quantize a model (SparseGPT, GPTQ, Wanda, ADMM) into a new model directory.",
             epilog="""\b
Examples:
  llmprune compress smollm2-135m --out sm-50 --calib shakespeare --nsamples 32 --seqlen 512
  llmprune compress meta-llama/Llama-3.2-1B --out l1b-24 --pattern 2:4
  llmprune compress ./my-model --out ./my-model-w4 --wbits 4 --group-size 128 --format compressed-tensors""")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--lazy/--no-lazy", default=True, show_default=True,
              help="Local safetensors directories: read each block's weights when its turn comes and write each"
                   " finished block to OUT.partial/ (resumable: re-run the same command after a crash).")
@click.option("--reuse-errors", type=click.Path(), default=None,
              help="With --allocation spdy: the llmprune.json (or its directory) of an earlier spdy run of this"
                   " model at the same sparsity; its searched allocation is reused instead of searched again.")
@_recipe_options
@_model_options
@_dist_read
@_log_file
def compress(model: str, out: str, overwrite: bool, lazy: bool, reuse_errors: str | None, config: str | None,
             tokenizer: str | None, revision: str | None, trust_remote_code: bool, dist_read: str,
             **flags) -> None:
    """Prune MODEL (hub id, model directory, .gguf file, or smollm2-135m) and write a model directory."""
    from llmprune import api

    recipe = build_recipe(config, **flags)
    report = api.compress(model, out, recipe, overwrite=overwrite, lazy=lazy, reuse_errors=reuse_errors,
                          tokenizer=tokenizer, revision=revision, trust_remote_code=trust_remote_code,
                          dist_read=dist_read)
    ckpt = report.checkpoint
    click.echo(
        f"compressed {len(report.layers)} linears ({recipe.label}): {report.global_sparsity:.2%} sparsity,"
        f" {ckpt['bits_per_weight']:.2f} bits/weight as {ckpt['format']} {ckpt.get('dtype', '?')} (dense fp16: 16),"
        f" in {report.timings['total_s']:.1f} s"
        f" -> {out}"
    )
    _echo_reconstruction(report.reconstruction)
    alloc = report.allocation or {}
    if alloc.get("lambda_search"):  # --owl-lambda auto: what each trial scored
        losses = ", ".join(f"{c['owl_lambda']:g}: {c['loss']:.4f}" for c in alloc["lambda_search"])
        click.echo(f"owl lambda {alloc['owl_lambda']:g}, the lowest calibration loss of the trials ({losses})")
    elif alloc.get("method") == "spdy" and "loss" in alloc:
        uniform = next((h["loss"] for h in alloc.get("history", []) if h.get("candidate") == "uniform"), None)
        click.echo(f"spdy allocation: calibration loss {alloc['loss']:.4f}"
                   + (f" (uniform {uniform:.4f})" if uniform is not None else "")
                   + f", searched from {alloc.get('anchor')}")
        if "bits" in alloc:
            counts = Counter(alloc["bits"].values())
            click.echo(f"bit-widths: {alloc['average_bits']:.3f} bits per weight on average (at most"
                       f" {alloc['target']:g}); layers per width: "
                       + ", ".join(f"{b}-bit {counts[b]}" for b in sorted(counts)))
    moe = report.experts or {}
    if moe.get("dropped") is not None:
        click.echo(f"dropped {moe['experts_before'] - moe['experts_after']} of {moe['experts_before']} experts in"
                   f" each of {len(moe['dropped'])} MoE layers")
    if recipe.format == "compressed-tensors" and not recipe.sym:
        click.echo("note: vLLM reads asymmetric pack-quantized checkpoints; transformers 5.x cannot yet"
                   " (vllm-project/llm-compressor#1618): use --sym to load it there", err=True)


@cli.command("eval-ppl", short_help="Perplexity of a model on a dataset (SparseGPT protocol).", epilog="""\b
Examples:
  llmprune eval-ppl sm-50 --dataset shakespeare --seqlen 512
  llmprune eval-ppl meta-llama/Llama-3.2-1B --dataset wikitext2 --max-windows 40 --json""")
@click.argument("model")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2, ptb, c4, shakespeare (built in, its held-out tail), hf:NAME[:CONFIG], or a"
                   " .txt/.jsonl/.json/.parquet file.")
@click.option("--split", default=None,
              help="The dataset's split (default test); local files: all (default), train or test.")
@click.option("--text-field", default="text", show_default=True, help="The rows' text field.")
@click.option("--bos/--no-bos", default=None, help="Start every window with BOS (default: when the tokenizer"
                                                    " adds one).")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per window (capped by context).")
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many windows.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              help="Compute dtype (default: the checkpoint's).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON line.")
@_model_options
@_dist_read
@_log_file
def eval_ppl(model: str, as_json: bool, **options) -> None:
    """Perplexity of MODEL on a dataset (SparseGPT protocol), streamed block by block."""
    from llmprune import api

    result = {"model": model} | api.evaluate(model, **options)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{model}: {result['dataset']} perplexity {result['ppl']:.3f} "
                   f"({result['windows']} x {result['seqlen']} tokens{', BOS first' if result['bos'] else ''},"
                   f" {result['seconds']:.1f} s)")


@cli.command(short_help="Compress with every method x sparsity and evaluate each: a table and a plot.",
             epilog="""\b
Examples:
  llmprune sweep smollm2-135m --out sweep --methods sparsegpt,wanda --sparsities 0.5,0.7,2:4
      --calib shakespeare --eval shakespeare --nsamples 32 --seqlen 512
  llmprune sweep ./my-model --out sweep-w4 --methods sparsegpt --sparsities 0.5,2:4 --wbits none,4""")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Sweep directory: results.csv/.json/.md, ppl_vs_sparsity.png, cells/ (resumable).")
@click.option("--methods", default=None, help="Comma-separated methods, e.g. sparsegpt,wanda,magnitude,admm.")
@click.option("--sparsities", default=None, help="Comma-separated sparsities and N:M patterns, e.g. 0.5,0.7,2:4.")
@click.option("--wbits", "grid_wbits", default=None,
              help="Comma-separated bits per cell, 'none' for unquantized (default: none), e.g. none,4.")
@click.option("--eval", "evals", default="wikitext2", show_default=True,
              help="Comma-separated evaluation datasets (as eval-ppl's --dataset).")
@click.option("--eval-seqlen", type=int, default=None, help="Evaluation window (default: --seqlen).")
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many windows per dataset.")
@click.option("--keep-checkpoints", is_flag=True, help="Also write every cell's model to OUT/checkpoints/.")
@click.option("--tasks", default=None,
              help="Comma-separated lm-eval zero-shot tasks: names, or task YAML files (needs lm-eval).")
@_recipe_options(exclude=("--method", "--sparsity", "--pattern", "--wbits"))
@_model_options
@_log_file
def sweep(model: str, out: str, methods: str | None, sparsities: str | None, grid_wbits: str | None, evals: str,
          eval_seqlen: int | None, max_windows: int | None, keep_checkpoints: bool, tasks: str | None,
          config: str | None, tokenizer: str | None, revision: str | None, trust_remote_code: bool,
          **flags) -> None:
    """Compress MODEL with every method x sparsity on one calibration set and evaluate every cell alike.

    --config takes a YAML grid: methods, sparsities, wbits, eval, tasks, and recipe (the shared recipe's keys).
    """
    from llmprune import api

    recipe, grid = build_sweep(config, flags)
    rows = api.sweep(model, out, methods=methods or grid.get("methods"),
                     sparsities=sparsities or grid.get("sparsities"), wbits=grid_wbits or grid.get("wbits"),
                     evals=grid.get("eval", evals) if evals == "wikitext2" else evals, recipe=recipe,
                     tokenizer=tokenizer, eval_seqlen=eval_seqlen, max_windows=max_windows,
                     keep_checkpoints=keep_checkpoints, tasks=tasks or grid.get("tasks"), revision=revision,
                     trust_remote_code=trust_remote_code)
    click.echo((Path(out) / "results.md").read_text(), nl=False)
    click.echo(f"{len(rows) - 1} cells and the dense model -> {out}/results.csv, results.json, results.md,"
               " ppl_vs_sparsity.png")


@cli.command(short_help="Structured pruning: fewer MLP channels, heads or blocks; a smaller, faster model.",
             epilog="""\b
Examples:
  llmprune shrink smollm2-135m --out sm-mlp25 --mlp 0.25 --calib shakespeare --nsamples 32 --seqlen 512
  llmprune shrink ./my-model --out ./my-model-small --heads 0.25 --drop-blocks 2
  llmprune bench-speed ./my-model ./my-model-small      (how much faster)""")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model directory.")
@click.option("--mlp", type=float, default=0.0, show_default=True, help="Fraction of every block's MLP channels"
                                                                          " removed.")
@click.option("--heads", type=float, default=0.0, show_default=True,
              help="Fraction of every block's attention heads removed (GQA: as many from every KV group).")
@click.option("--drop-blocks", type=int, default=0, show_default=True,
              help="Whole blocks removed: those whose output is most like their input.")
@click.option("--method", "shrink_method", type=click.Choice(["obs", "l1", "wanda"]),
              default="obs", show_default=True,
              help="obs: second-order cost on the consumer's Hessian, with its update; l1, wanda: scores only.")
@click.option("--align", type=int, default=64, show_default=True,
              help="Kept MLP channels rounded to a multiple of this (1: no rounding).")
@click.option("--drop-experts", type=float, default=0.0, show_default=True,
              help="Mixture of experts: fraction of each layer's experts removed, those with the lowest"
                   " router-weighted output norm (REAP).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--lazy/--no-lazy", default=True, show_default=True,
              help="Stream a safetensors directory from disk one block at a time (else load it whole).")
@_recipe_options(exclude=("--method", "--sparsity", "--pattern", "--allocation", "--drop-experts",
                          "--min-expert-tokens"))
@_model_options
@_log_file
def shrink(model: str, out: str, mlp: float, heads: float, drop_blocks: int, shrink_method: str, align: int,
           drop_experts: float, overwrite: bool, lazy: bool, config: str | None, tokenizer: str | None,
           revision: str | None, trust_remote_code: bool, **flags) -> None:
    """Structured pruning: a smaller standard model (fewer MLP channels, heads, blocks) that runs faster."""
    from llmprune import api

    recipe = build_recipe(config, **flags)
    report = api.shrink(model, out, recipe, mlp=mlp, heads=heads, drop_blocks=drop_blocks, method=shrink_method,
                        align=align, drop_experts=drop_experts, overwrite=overwrite, lazy=lazy,
                        tokenizer=tokenizer, revision=revision, trust_remote_code=trust_remote_code)
    before, after = report["params"]["before"], report["params"]["after"]
    sizes = report["sizes"]
    parts = []
    if sizes["mlp_channels"]:
        parts.append(f"MLP {sizes['mlp_channels'][0]} -> {sizes['mlp_channels'][1]} channels")
    if sizes["heads"]:
        parts.append(f"heads {sizes['heads'][0]} -> {sizes['heads'][1]}")
    if sizes["experts"]:
        parts.append(f"experts {sizes['experts'][0]} -> {sizes['experts'][1]} per MoE layer")
    if report.get("layers") is not None:  # --wbits: quantized after shrinking
        q = report["recipe"]
        parts.append(f"then {q['wbits']}-bit (group {q['group_size']}) on {len(report['layers'])} linears")
    click.echo(f"shrunk ({shrink_method}): " + ", ".join(parts)
               + f"{', ' if parts else ''}blocks {sizes['blocks'][0]} -> {sizes['blocks'][1]}; {before:,} -> {after:,}"
               " parameters"
               f" ({1 - after / before:.1%} fewer) -> {out}")
    _echo_reconstruction(report.get("shrink_reconstruction", report.get("reconstruction")), " after shrinking")
    if "shrink_reconstruction" in report:
        _echo_reconstruction(report.get("reconstruction"), " after quantizing")


@cli.command("bench-speed", short_help="Prefill and decode tokens/s of models side by side.", epilog="""\b
Examples:
  llmprune bench-speed smollm2-135m sm-mlp25
  llmprune bench-speed ./my-model ./my-model-small --tokens 2048 --batch 4 --device cuda""")
@click.argument("models", nargs=-1, required=True)
@click.option("--tokens", type=int, default=512, show_default=True, help="Prefill tokens per sequence.")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences per forward pass.")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Tokens decoded per repeat.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Interleaved repeats (medians).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              help="Compute dtype (default: the checkpoint's).")
@_log_file
def bench_speed(models: tuple[str, ...], tokens: int, batch: int, new_tokens: int, repeats: int, device: str,
                dtype: str) -> None:
    """Prefill and decode tokens/s of each MODEL with plain transformers, side by side (ratios to the first)."""
    from llmprune import speed

    rows = speed.bench_speed(list(models), tokens=tokens, batch=batch, new_tokens=new_tokens, repeats=repeats,
                             device=device, dtype=dtype)
    first = rows[0]
    click.echo(f"{'model':<40} {'params':>13} {'prefill tok/s':>14} {'x':>6} {'decode tok/s':>13} {'x':>6}")
    for r in rows:
        click.echo(f"{r['model'][-40:]:<40} {r['params']:>13,} {r['prefill_tok_s']:>14.1f}"
                   f" {r['prefill_tok_s'] / first['prefill_tok_s']:>6.2f} {r['decode_tok_s']:>13.1f}"
                   f" {r['decode_tok_s'] / first['decode_tok_s']:>6.2f}")


SWEEP_KEYS = {"methods", "sparsities", "wbits", "eval", "tasks", "recipe"}


def build_sweep(config: str | None, flags: dict) -> tuple[Recipe, dict]:
    """(shared recipe, grid keys) from an optional YAML grid and the recipe flags given."""
    import yaml

    grid: dict = {}
    if config:
        try:
            grid = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"sweep config {config!r} cannot be read ({type(exc).__name__})") from None
        if not isinstance(grid, dict) or set(grid) - SWEEP_KEYS:
            raise UsageError(f"sweep config {config!r}: unknown keys {sorted(set(grid) - SWEEP_KEYS)}; known keys:"
                             f" {', '.join(sorted(SWEEP_KEYS))}")
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    base = recipe_from_dict(grid.get("recipe") or {}, source=config or "recipe")
    return recipe_from_dict(base.to_dict() | given, source="options"), grid


_kernels = click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default="auto",
                        show_default=True, help="Triton kernels (auto: on CUDA) or their torch twins.")
_pack_device = click.option("--device", default="auto", show_default=True,
                            help="Where layers are (un)packed: auto (CUDA when available), cpu, cuda, cuda:N.")


@cli.command(short_help="Store a 2:4 checkpoint's linears as kept values + 2-bit positions (smaller files).",
             epilog="""\b
Examples:
  llmprune compress smollm2-135m --out sm-24 --pattern 2:4 --calib shakespeare
  llmprune pack sm-24 --pattern 2:4 --out sm-24-packed
  llmprune inspect sm-24-packed""")
@click.argument("model")
@click.option("--pattern", required=True, help="2:4 (4:8 layers are stored as 2:4 where they also hold 2:4).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--skip-nonconforming", is_flag=True, help="Keep layers that do not hold 2:4 dense (and list them).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@_kernels
@_pack_device
@_log_file
def pack(model: str, pattern: str, out: str, skip_nonconforming: bool, overwrite: bool, kernels: str,
         device: str) -> None:
    """Store the 2:4 linears of MODEL (a compressed checkpoint directory) as kept values + 2-bit positions."""
    from llmprune import api

    manifest = api.pack(model, out, pattern, skip_nonconforming=skip_nonconforming, overwrite=overwrite,
                        kernels=kernels, device=device)
    ratio = manifest["packed_bytes"] / manifest["dense_fp16_bytes"]
    click.echo(f"packed {len(manifest['layers'])} linears as 2:4: {manifest['packed_bytes']:,} bytes,"
               f" {16 * ratio:.2f} bits/weight, {ratio:.3f} of their dense fp16 size -> {out}")
    if manifest["dense_layers"]:
        click.echo(f"kept dense (not 2:4): {', '.join(manifest['dense_layers'])}")


@cli.command(short_help="Write a packed 2:4 directory back as a dense model directory (exact).", epilog="""\b
Example:
  llmprune unpack sm-24-packed --out sm-24-dense""")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dense model directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@_kernels
@_pack_device
@_log_file
def unpack(model: str, out: str, overwrite: bool, kernels: str, device: str) -> None:
    """Write a packed MODEL directory back as a dense Hugging Face model directory (exact)."""
    from llmprune import api

    api.unpack(model, out, overwrite=overwrite, kernels=kernels, device=device)
    click.echo(f"unpacked {model} -> {out}")


@cli.command(short_help="Per linear and in total: format, pattern, sparsity, bits, bytes on disk.", epilog="""\b
Examples:
  llmprune inspect sm-50
  llmprune inspect sm-24-packed --json""")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON line.")
@_log_file
def inspect(model: str, as_json: bool) -> None:
    """Per linear and in total: format, pattern, sparsity, bits, bytes on disk vs dense fp16."""
    from llmprune import api
    from llmprune.checkpoint_info import format_table

    info = api.inspect(model)
    click.echo(json.dumps(info) if as_json else format_table(info))


DEMO_NAME = "smollm2-135m-sparsegpt50"


def demo_out(out: str | None) -> Path:
    """The demo's checkpoint directory: --out, else the user's cache (``$XDG_CACHE_HOME/llmprune/``, default
    ``~/.cache/llmprune/``), never the current directory, which may be a source checkout."""
    if out is not None:
        return Path(out).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "llmprune" / DEMO_NAME


@cli.command(short_help="Offline end to end: SmolLM2-135M pruned 50% by SparseGPT, dense vs pruned perplexity.",
             epilog="""\b
Examples:
  llmprune demo
  llmprune demo --overwrite                      (run it again, replacing the earlier checkpoint)
  llmprune demo --nsamples 8 --max-windows 8     (quicker, noisier)""")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help=f"Where the pruned checkpoint goes (default: $XDG_CACHE_HOME/llmprune/{DEMO_NAME}, i.e."
                   f" ~/.cache/llmprune/{DEMO_NAME}).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (an earlier demo's checkpoint).")
@click.option("--nsamples", type=int, default=32, show_default=True,
              help="Calibration windows, cut from the Shakespeare text's training part.")
@click.option("--seqlen", type=int, default=512, show_default=True,
              help="Tokens per window, for calibration and evaluation.")
@click.option("--max-windows", type=int, default=32, show_default=True,
              help="Held-out evaluation windows, for both perplexities.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:N.")
@_log_file
def demo(out: str | None, nsamples: int, seqlen: int, max_windows: int, overwrite: bool, device: str) -> None:
    """Offline end to end: load the built-in SmolLM2-135M, measure its perplexity on held-out Shakespeare, prune
    it 50% by SparseGPT calibrated on the rest, save the checkpoint, and print both perplexities."""
    from llmprune import api
    from llmprune.loading import bf16_pays

    path = demo_out(out)
    recipe = Recipe(calib="shakespeare", nsamples=nsamples, seqlen=seqlen, device=device)
    api.check_output_dir(path, overwrite, None)  # before the model loads
    click.echo(f"the pruned checkpoint goes to {path}")
    # in the dtype compress writes a GGUF in: bf16 (half of fp32's size) where it is native, else fp32
    model, tok = api.load("smollm2-135m", dtype="bfloat16" if bf16_pays(device) else "float32")
    click.echo("evaluating the dense model ...")
    evaluate = dict(tokenizer=tok, seqlen=seqlen, device=device, batch_size=8, max_windows=max_windows)
    before = api.evaluate(model, "shakespeare", **evaluate)
    click.echo("pruning (SparseGPT, 50% unstructured) ...")
    report = api.compress(model, path, recipe, tokenizer=tok, overwrite=overwrite)
    after = api.evaluate(model, "shakespeare", **evaluate)
    click.echo(f"{'model':<28}{'sparsity':>10}{'perplexity':>12}")
    click.echo(f"{'SmolLM2-135M dense':<28}{0:>10.2%}{before['ppl']:>12.3f}")
    click.echo(f"{'SmolLM2-135M SparseGPT':<28}{report.global_sparsity:>10.2%}{after['ppl']:>12.3f}")
    click.echo(f"(held-out Shakespeare, {after['windows']} x {after['seqlen']} tokens; "
               f"pruning took {report.timings['prune_s']:.1f} s; checkpoint in {path})")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 for bad input, never a traceback. The library's log
    (INFO and up) goes to stderr as ``llmprune: message``."""
    distributed = None  # torch (under torchrun only): --help and bad flags answer without importing it
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from llmprune import distributed
    launched = distributed.init() if distributed is not None else False  # under torchrun
    main_rank = not launched or distributed.is_main()
    me = f"llmprune[rank {distributed.rank()}]" if launched else "llmprune"
    terminal = logging.StreamHandler()  # sys.stderr as it is now (tests capture it)
    terminal.setFormatter(logging.Formatter(f"{me}: %(message)s"))
    log.addHandler(terminal)
    log.setLevel(logging.INFO if main_rank else logging.WARNING)
    if not main_rank:  # rank 0 prints the results and the progress bars; the others stay quiet
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    try:
        with signals.installed():  # SIGINT, SIGTERM: the block in flight dropped, a line saying where it stopped
            cli.main(args=argv, prog_name="llmprune", standalone_mode=False)
        if distributed is not None:
            distributed.shutdown()  # torchrun: leave the group cleanly (gloo aborts a process that does not)
    except signals.Interrupted as exc:
        click.echo(f"{me}: {signals.interrupted_line()}", err=True)
        sys.exit(exc.exit_code)
    except (UsageError, CholeskyError) as exc:
        click.echo(f"{me}: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("llmprune: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"llmprune: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else 2)
    finally:
        log.removeHandler(terminal)
    sys.exit(0)
