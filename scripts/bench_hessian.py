"""What each ``--hessian-dtype`` costs: one Hessian update (2048 tokens into H = 2/n Σ xxᵀ) per layer width.

``fp64`` accumulates in float64 so that torchrun's output hardly depends on the rank count (bit for bit in every
case bench_torchrun_repro measured, not guaranteed); this measures its price
against ``fp32`` (and, on CUDA, against ``auto``'s tensor-core path from bf16 activations), interleaved
repeats, medians, in one process.

    python scripts/bench_hessian.py [--device cpu|cuda] [--widths 576,1536,4096]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tables import publish  # scripts/tables.py

from llmprune.hessian import accumulator_dtype, hessian_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", default="576,1536,4096")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    modes = ["fp32", "fp64"] + (["auto"] if dev.type == "cuda" else [])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    lines = [f"# bench_hessian: one update of {args.tokens} tokens, medians of {args.repeats} interleaved repeats;"
             f" {name}, {platform.machine()}, torch {torch.__version__}",
             f"{'width':>6} " + " ".join(f"{m + ' ms':>10}" for m in modes) + f" {'fp64/fp32':>10}"]
    torch.manual_seed(0)
    for cols in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, cols, device=dev)
        inputs = {m: x.bfloat16() if m == "auto" else x for m in modes}
        H = {m: torch.zeros(cols, cols, dtype=accumulator_dtype(m), device=dev) for m in modes}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.repeats + 1):  # the first round warms up
            for m in modes:
                sync()
                t = time.perf_counter()
                hessian_update(H[m], 0, inputs[m], m)
                sync()
                if rep:
                    times[m].append(1000 * (time.perf_counter() - t))
        med = {m: statistics.median(v) for m, v in times.items()}
        row = " ".join(f"{med[m]:>10.2f}" for m in modes)
        lines.append(f"{cols:>6} {row} {med['fp64'] / med['fp32']:>10.2f}")
    default = f"bench_hessian_{dev.type}.txt"
    publish(lines, args.out or Path(__file__).parent / "results" / default)


if __name__ == "__main__":
    main()
