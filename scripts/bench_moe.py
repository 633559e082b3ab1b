"""Mixture-of-experts compression cost: per family, compress wall time against the same model's dense forward
over the calibration windows, and the process's peak RSS. One subprocess per family, so peaks are its own.

    python scripts/bench_moe.py [--experts 8] [--hidden 256] [--layers 4] [--nsamples 32] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

FAMILIES = {
    "mixtral": lambda e, i: dict(num_local_experts=e, num_experts_per_tok=2, intermediate_size=i),
    "qwen3_moe": lambda e, i: dict(num_experts=e, num_experts_per_tok=2, moe_intermediate_size=i),
    "qwen2_moe": lambda e, i: dict(num_experts=e, num_experts_per_tok=2, moe_intermediate_size=i,
                                   shared_expert_intermediate_size=2 * i),
    "gpt_oss": lambda e, i: dict(num_local_experts=e, num_experts_per_tok=2, intermediate_size=i, sliding_window=64,
                                 layer_types=None),
}


def one(family: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune.compression import compress_model
    from llmprune.recipe import Recipe

    torch.manual_seed(0)
    kw = FAMILIES[family](args.experts, args.hidden * 2)
    if family == "gpt_oss":
        kw["layer_types"] = ["sliding_attention", "full_attention"] * (args.layers // 2)
    config = AutoConfig.for_model(family, vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                                  max_position_embeddings=args.seqlen, **kw)
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = torch.randint(0, 1024, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, args.nsamples, 8):
            model(input_ids=windows[b:b + 8], use_cache=False)
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = Recipe(sparsity=0.5, device="cpu", min_expert_tokens=1).resolve()
    report = compress_model(model, None, run, windows=windows, progress=False)
    wall = time.perf_counter() - t0
    experts = [r for r in report["layers"] if ".experts." in r["name"]]
    return {"family": family, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "expert_matrices": len(experts), "forward_s": forward, "compress_s": wall,
            "tokens_min": min(r["tokens"] for r in experts), "tokens_max": max(r["tokens"] for r in experts),
            "sparsity": report["global_sparsity"],
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--family", default=None, help=argparse.SUPPRESS)  # one family, in a subprocess
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_moe.txt"))
    args = ap.parse_args()
    if args.family:
        print(json.dumps(one(args.family, args)))
        return
    rows = []
    for family in FAMILIES:
        cmd = [sys.executable, __file__, "--family", family] + [f"--{k}={getattr(args, k)}" for k in
                                                                 ("experts", "hidden", "layers", "nsamples", "seqlen")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    sys.path.insert(0, str(Path(__file__).parent))
    from tables import publish

    lines = [f"MoE compress (sparsegpt 50%, sequential), {args.layers} blocks x {args.experts} experts top-2,"
             f" hidden {args.hidden}, {args.nsamples} x {args.seqlen} calibration tokens, CPU",
             "| family | params (M) | expert matrices | routed tokens min-max | dense forward s | compress s |"
             " compress / forward | sparsity | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['params_M']:.1f} | {r['expert_matrices']} | {r['tokens_min']}-"
                     f"{r['tokens_max']} | {r['forward_s']:.2f} | {r['compress_s']:.2f} |"
                     f" {r['compress_s'] / r['forward_s']:.1f}x | {r['sparsity']:.4f} | {r['peak_rss_MiB']:.0f} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
