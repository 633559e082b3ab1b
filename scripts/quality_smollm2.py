"""Held-out perplexity of SmolLM2-135M under each recipe, each written as a checkpoint and loaded back.

Calibration: 16 x 256 tokens of the Shakespeare train part; evaluation: 16 x 256 tokens of the held-out
tail. Quantized recipes are written as compressed-tensors pack-quantized checkpoints, loaded back with
``AutoModelForCausalLM.from_pretrained`` (compressed-tensors installed) and evaluated from the loaded model,
so the table also proves the checkpoints load. SmolLM2 was itself distributed 4-bit (Q4_1, group 32):
compare methods with each other, not with the dense model.

    python scripts/quality_smollm2.py [--recipes NAME,...] [--nsamples 16] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from smollm2 import CPU, setup  # scripts/smollm2.py
from tables import publish  # scripts/tables.py

from llmprune.checkpoint import save_compressed_tensors
from llmprune.compression import compress_model
from llmprune.perplexity import perplexity

RECIPES = {
    "dense": None,
    "sparsegpt 50%": dict(sparsity=0.5),
    "rtn w4g64": dict(method="rtn", wbits=4, group_size=64),
    "gptq w4g64": dict(wbits=4, group_size=64),
    "gptq w4g64 act-order": dict(wbits=4, group_size=64, act_order=True),
    "gptq w3g64": dict(wbits=3, group_size=64),
    "rtn w3g64": dict(method="rtn", wbits=3, group_size=64),
    "magnitude 50% + rtn w4g64": dict(method="magnitude", sparsity=0.5, wbits=4, group_size=64),
    "wanda 50% + rtn w4g64": dict(method="wanda", sparsity=0.5, wbits=4, group_size=64),
    "sparsegpt 50% + w4g64 joint": dict(sparsity=0.5, wbits=4, group_size=64),
    "sparsegpt 2:4 + w4g64 joint": dict(pattern="2:4", wbits=4, group_size=64),
    "sparsegpt 70% uniform": dict(sparsity=0.7),
    "sparsegpt 70% owl": dict(sparsity=0.7, allocation="owl"),
    "sparsegpt 70% spdy": dict(sparsity=0.7, allocation="spdy"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_smollm2.txt"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    model, tokenizer, pristine, base, windows, held_out = setup(args.nsamples, args.seqlen, 16)
    cpu = CPU

    rows = []
    for name in args.recipes.split(","):
        changes = RECIPES[name]
        model.load_state_dict(pristine)
        if changes is None:
            rows.append((name, 0.0, "-", perplexity(model, held_out, cpu), 0.0))
            continue
        recipe = base.replace(**changes)
        t0 = time.perf_counter()
        grids: dict = {}
        report = compress_model(model, tokenizer, recipe.resolve(), windows, grids=grids)
        seconds = time.perf_counter() - t0
        if recipe.wbits is None:
            rows.append((name, report["global_sparsity"], "16/32", perplexity(model, held_out, cpu), seconds))
            continue
        with tempfile.TemporaryDirectory() as d:
            info = save_compressed_tensors(model, tokenizer, Path(d), report, grids)
            loaded = AutoModelForCausalLM.from_pretrained(d).eval()
            ppl = perplexity(loaded, held_out, cpu)
        rows.append((name, report["global_sparsity"], f"{info['bits_per_weight']:.2f}", ppl, seconds))
        print(rows[-1], flush=True)

    lines = [
        f"# quality_smollm2: SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} Shakespeare (train part),"
        f" held-out 16 x {args.seqlen}; torch {torch.__version__}, CPU",
        "# quantized rows: evaluated from the compressed-tensors checkpoint loaded back by transformers",
        f"{'recipe':<30} {'zeros':>7} {'bits/w':>7} {'ppl':>9} {'compress s':>11}",
    ]
    lines += [f"{n:<30} {z:>7.2%} {b:>7} {p:>9.2f} {s:>11.1f}" for n, z, b, p, s in rows]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
