"""Two-pass vs sequential (one forward per block) on SmolLM2-135M: wall time and held-out perplexity.

Same calibration windows (Shakespeare train part) and the same held-out windows for every row, in one
process; the two orders of each setting run back to back, in alternating order, so read the ratios.

    python scripts/bench_sequential.py [--nsamples 32] [--seqlen 512] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from smollm2 import CPU, setup  # scripts/smollm2.py
from tables import publish  # scripts/tables.py

from llmprune.compression import compress_model
from llmprune.perplexity import perplexity

SETTINGS = {
    "sparsegpt 50%": dict(sparsity=0.5),
    "sparsegpt 2:4": dict(pattern="2:4"),
    "sparsegpt 50% + w4g64": dict(sparsity=0.5, wbits=4, group_size=64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_sequential.txt"))
    args = ap.parse_args()

    model, tokenizer, pristine, base, windows, held_out = setup(args.nsamples, args.seqlen, args.eval_windows)
    cpu = CPU
    dense = perplexity(model, held_out, cpu, progress=False)
    rows = []
    for k, name in enumerate(args.settings.split(",")):
        result = {}
        orders = (False, True) if k % 2 == 0 else (True, False)  # alternate who runs first
        for sequential in orders:
            model.load_state_dict(pristine)
            recipe = base.replace(sequential=sequential, **SETTINGS[name])
            t0 = time.perf_counter()
            report = compress_model(model, tokenizer, recipe.resolve(), windows, progress=False)
            seconds = time.perf_counter() - t0
            ppl = perplexity(model, held_out, cpu, progress=False)
            kept = (report["sequential"] or {}).get("kept_inputs_peak_bytes", 0)
            result[sequential] = (seconds, ppl, kept)
            print(name, "sequential" if sequential else "two-pass", f"{seconds:.1f} s", f"ppl {ppl:.3f}",
                  flush=True)
        (t2, p2, _), (t1, p1, kept) = result[False], result[True]
        rows.append(f"{name:<24} {t2:>11.1f} {t1:>12.1f} {t1 / t2:>7.2f} {p2:>12.3f} {p1:>12.3f} {p1 / p2:>7.3f}"
                    f" {kept / 2**20:>9.1f}")
    lines = [
        f"# bench_sequential: SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} Shakespeare (train part),"
        f" held-out {held_out.shape[0]} x {args.seqlen} (dense ppl {dense:.3f}); CPU, {os.cpu_count()} cores,"
        f" {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "# wall = compress_model (calibration windows given, load excluded); kept = peak of the inputs held across"
        " batches before one sublayer",
        f"{'setting':<24} {'two-pass s':>11} {'sequential s':>12} {'ratio':>7} {'two-pass ppl':>12}"
        f" {'seq ppl':>12} {'ratio':>7} {'kept MiB':>9}",
        *rows,
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
