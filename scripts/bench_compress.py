"""Compress-time benchmark: SmolLM2-135M, SparseGPT 50%, 32 calibration windows of 512 tokens (defaults).

Prints wall time per phase, peak RSS, and the time of one dense forward pass of the calibration set through
the whole model, measured in the same process: the floor of the job is two such passes (Hessians, then
propagation) plus the solves, and the target is compress <= 2.5 x one pass.

    python scripts/bench_compress.py [--nsamples 32] [--seqlen 512] [--methods sparsegpt,sparsegpt+w4g64,...]

A method ``NAME+wBgG`` quantizes too (B bits, groups of G; ``+w4`` alone is per channel): the joint
sparsity + quantization pass, whose target is <= 1.15 x the wall time of pruning alone.
"""

from __future__ import annotations

import argparse
import copy
import platform
import re
import resource
import time
from pathlib import Path

import torch
from tables import publish  # scripts/tables.py

from llmprune.calibration import calibration_set
from llmprune.compression import compress_model
from llmprune.data import batched
from llmprune.engine import Stream
from llmprune.loading import load_model
from llmprune.recipe import Recipe


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def variant(recipe: Recipe, spec: str) -> Recipe:
    """'sparsegpt' -> method only; 'sparsegpt+w4g64' -> also 4-bit, groups of 64."""
    method, _, quant = spec.partition("+")
    recipe = recipe.replace(method=method)
    if quant:
        m = re.fullmatch(r"w(\d)(?:g(\d+))?", quant)
        if not m:
            raise SystemExit(f"bad method spec {spec!r}: use e.g. sparsegpt+w4g64")
        recipe = recipe.replace(wbits=int(m.group(1)), group_size=int(m.group(2) or -1),
                                sparsity=recipe.target_sparsity)
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default="sparsegpt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_compress.txt"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tokenizer, _ = load_model(args.model)
    load_s = time.perf_counter() - t0
    pristine = copy.deepcopy(model.state_dict())
    recipe = Recipe(calib="shakespeare", nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                    device=args.device)
    windows, _ = calibration_set(tokenizer, model, recipe.resolve().calibration)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    # one dense forward pass of the calibration set through the whole model (head included)
    model.to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in batched(windows, args.batch_size):
            model(input_ids=ids.to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dense_pass_s = time.perf_counter() - t0
    model.to("cpu")

    # the same data streamed block by block with nothing to do per block (engine overhead, no head)
    t0 = time.perf_counter()
    Stream(model, batched(windows, args.batch_size), device).run(desc="stream")
    stream_pass_s = time.perf_counter() - t0

    rows = []
    for method in args.methods.split(","):
        model.load_state_dict(pristine)
        t0 = time.perf_counter()
        report = compress_model(model, tokenizer, variant(recipe, method).resolve(), windows)
        wall = time.perf_counter() - t0
        solve_s = sum(layer["seconds"] for layer in report["layers"])
        rows.append((method, wall, solve_s, wall / dense_pass_s, report["global_sparsity"]))

    base = rows[0][1]
    lines = [
        f"# bench_compress: {args.model}, {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, "
        f"device {device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        f"load {load_s:.1f} s | one dense forward pass (with head) {dense_pass_s:.2f} s | "
        f"streamed pass, blocks only {stream_pass_s:.2f} s",
        f"{'method':<20} {'wall s':>8} {'solves s':>9} {'x dense pass':>13} {'x first row':>12} {'sparsity':>9}",
    ]
    lines += [f"{m:<20} {w:>8.2f} {s:>9.2f} {r:>13.2f} {w / base:>12.3f} {sp:>9.4f}" for m, w, s, r, sp in rows]
    lines.append(f"peak RSS {peak_rss_gib():.2f} GiB (whole process, model load included)")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
