"""Block-wise reconstruction (--reconstruct) on SmolLM2-135M: held-out perplexity, wall and peak RSS, with and
without, the same windows for every row.

Calibration on the Shakespeare train part, perplexity on its held-out tail; one process, rows run one after
the other (read the ratios: the machine is shared). Each ``+ rec`` row is its base row with
``--reconstruct STEPS`` at the defaults unless the row names a target or granularity.

    python scripts/bench_reconstruct.py [--nsamples 32] [--seqlen 512] [--steps 32] [--rows NAME,...]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import time
from pathlib import Path

import torch
from smollm2 import CPU, setup  # scripts/smollm2.py
from tables import publish  # scripts/tables.py

from llmprune.compression import compress_model
from llmprune.loading import bf16_pays
from llmprune.perplexity import perplexity
from llmprune.recipe import RECONSTRUCT_STEPS
from llmprune.shrinking import ShrinkSpec, shrink_model

BASE = {
    "sparsegpt 50%": dict(sparsity=0.5),
    "sparsegpt 70%": dict(sparsity=0.7),
    "sparsegpt 2:4": dict(pattern="2:4"),
    "admm 50%": dict(method="admm", sparsity=0.5),
    "admm 70%": dict(method="admm", sparsity=0.7),
    "admm 2:4": dict(method="admm", pattern="2:4"),
    "joint 50% + w4g64": dict(sparsity=0.5, wbits=4, group_size=64),
    "gptq w3g64": dict(sparsity=0.0, wbits=3, group_size=64),  # SmolLM2's 576 inputs: 128 does not divide them
}
SHRINK = {"shrink mlp -20%": ShrinkSpec(mlp=0.2), "shrink mlp -35%": ShrinkSpec(mlp=0.35),
          "shrink heads+mlp -20%": ShrinkSpec(mlp=0.15, heads=1 / 3)}
VARIANTS = {"": {}, " + rec": {"rec": True},
            " + rec compressed": {"rec": True, "reconstruct_target": "compressed"},
            " + rec sublayer": {"rec": True, "reconstruct_granularity": "sublayer"},
            " + rec norms": {"rec": True, "reconstruct_norms": True}}
DEFAULT_ROWS = ["sparsegpt 70%", "sparsegpt 70% + rec", "sparsegpt 70% + rec compressed",
                "sparsegpt 70% + rec sublayer", "sparsegpt 2:4", "sparsegpt 2:4 + rec", "gptq w3g64",
                "gptq w3g64 + rec", "shrink mlp -20%", "shrink mlp -20% + rec", "admm 70%", "admm 70% + rec",
                "sparsegpt 50%", "sparsegpt 50% + rec"]


def parse(name: str) -> tuple[str, dict]:
    """A row name -> (base row, variant options)."""
    for suffix in sorted(VARIANTS, key=len, reverse=True):
        if suffix and name.endswith(suffix):
            return name.removesuffix(suffix), VARIANTS[suffix]
    return name, {}


def sparsegpt_of(name: str) -> str | None:
    """The plain sparsegpt row at the same sparsity as a sparsegpt/admm row, else None."""
    row = parse(name)[0].split()
    return f"sparsegpt {row[1]}" if row[0] in ("sparsegpt", "admm") else None


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="--reconstruct STEPS (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward, and per training step")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="the model's dtype in memory (auto: what compress computes fp32 sources in on this CPU,"
                         " bfloat16 where it is native, else float32)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_reconstruct.txt"))
    args = ap.parse_args()

    model, tokenizer, pristine, base, windows, held_out = setup(args.nsamples, args.seqlen, args.eval_windows)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if bf16_pays(CPU) else "float32"
    dtype = getattr(torch, args.dtype)
    model.to(dtype)
    pristine = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pristine.items()}
    base = base.replace(batch_size=args.batch_size)
    steps = args.steps or RECONSTRUCT_STEPS
    dense = perplexity(model, held_out, CPU, progress=False)
    results: dict[str, tuple[float, float, float, str]] = {}
    for name in args.rows.split(","):
        row, variant = parse(name)
        opts = {k: v for k, v in variant.items() if k != "rec"}
        if variant.get("rec"):
            opts["reconstruct"] = steps
            if args.lr is not None:
                opts["reconstruct_lr"] = args.lr
        model.load_state_dict(pristine)
        t0 = time.perf_counter()
        if row in SHRINK:
            m = copy.deepcopy(model)
            report = shrink_model(m, tokenizer, base.replace(**opts).resolve(), SHRINK[row], progress=False,
                                  calibration=(windows, {"source": "bench"}))
        else:
            m = model
            report = compress_model(m, tokenizer, base.replace(**BASE[row], **opts).resolve(), windows, progress=False)
        seconds = time.perf_counter() - t0
        ppl = perplexity(m, held_out, CPU, progress=False)
        rec = report.get("reconstruction")
        note = (f"loss {rec['loss_before_mean']:.4f}->{rec['loss_after_mean']:.4f}, {len(rec['reverted'])} reverted"
                if rec else "")
        results[name] = (ppl, seconds, peak_rss_gib(), note)
        print(f"{name:<34} {ppl:9.3f} {seconds:8.1f} s  {note}", flush=True)
        del m

    def ratio(a: str, b: str) -> str:
        return f"{results[a][0] / results[b][0]:.3f}" if a in results and b in results else "-"

    pairs = [(n, parse(n)[0]) for n in results if parse(n)[1]]
    lines = [
        f"# bench_reconstruct: SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} Shakespeare (train part),"
        f" held-out {held_out.shape[0]} x {args.seqlen} (dense ppl {dense:.3f}); --reconstruct {steps}"
        f" (lr {args.lr or base.reconstruct_lr:g}); CPU, {os.cpu_count()} cores, {platform.machine()},"
        f" torch {torch.__version__}; {args.dtype} in memory, batch {args.batch_size}; peak RSS: the process's so far",
        f"{'recipe':<34} {'ppl':>9} {'wall s':>8} {'peak GiB':>9}  block loss (mean over blocks)",
        *(f"{n:<34} {p:>9.3f} {s:>8.1f} {r:>9.2f}  {note}" for n, (p, s, r, note) in results.items()),
        "# ppl ratios, with / without: " + "; ".join(f"{n}: {ratio(n, b)}" for n, b in pairs),
        "# ppl ratios to sparsegpt at the same sparsity: " + "; ".join(
            f"{n}: {ratio(n, ref)}" for n in results if (ref := sparsegpt_of(n)) and ref != n),
        "# wall ratios, with / without: " + "; ".join(
            f"{n}: {results[n][1] / results[b][1]:.2f}" for n, b in pairs if b in results),
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
