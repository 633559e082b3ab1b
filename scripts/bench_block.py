"""One decoder block through the real per-block pipeline, timed by phase, projected to the whole model.

Builds a one-block random model of the requested shape, streams random calibration tokens into it, and times:
forward (dense pass), Hessians (the same pass with the accumulation hooks, minus the forward), Cholesky
(damped inverse factor of each Hessian), solve (the SparseGPT column sweep, minus its Cholesky), propagate
(the pass through the pruned block). Projection = per-block total x number of blocks.

    python scripts/bench_block.py --preset tiny                    # CPU-sized
    python scripts/bench_block.py --preset opt-175b --tokens 32768 --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch
from tables import publish  # scripts/tables.py

from llmprune.arch import find_blocks, find_linears, get_weight, set_weight
from llmprune.engine import Stream, default_device
from llmprune.hessian import HessianCollector
from llmprune.pattern import parse_pattern
from llmprune.solvers import sparsegpt
from llmprune.solvers.hinv import inverse_hessian_cholesky

PRESETS = {  # arch, hidden, intermediate, heads, kv heads, blocks
    "opt-175b": ("opt", 12288, 49152, 96, 96, 96),
    "llama2-70b": ("llama", 8192, 28672, 64, 8, 80),
    "llama3-8b": ("llama", 4096, 14336, 32, 8, 32),
    "tiny": ("llama", 512, 1536, 8, 4, 24),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def one_block_model(arch: str, hidden: int, inter: int, heads: int, kv: int, seqlen: int, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=256, num_hidden_layers=1, num_attention_heads=heads, max_position_embeddings=seqlen)
    if arch == "opt":
        config = AutoConfig.for_model("opt", hidden_size=hidden, ffn_dim=inter, word_embed_proj_dim=hidden, **common)
    else:
        config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter,
                                      num_key_value_heads=kv, **common)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny")
    ap.add_argument("--arch", choices=["opt", "llama"])
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--inter", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--blocks", type=int, help="blocks in the full model, for the projection")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens (the paper: 128 x 2048 = 262144)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--hessian-dtype", choices=["auto", "fp32"], default="auto")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="also write the table here (default scripts/results/...)")
    args = ap.parse_args()

    arch, hidden, inter, heads, kv, n_blocks = PRESETS[args.preset]
    arch = args.arch or arch
    hidden, inter = args.hidden or hidden, args.inter or inter
    heads, kv, n_blocks = args.heads or heads, args.kv_heads or kv, args.blocks or n_blocks
    device = default_device() if args.device == "auto" else torch.device(args.device)
    dtype = DTYPES[args.dtype]
    seqlen = min(args.seqlen, args.tokens)
    nsamples = max(1, args.tokens // seqlen)
    pattern = parse_pattern(args.pattern)

    torch.manual_seed(0)
    model = one_block_model(arch, hidden, inter, heads, kv, seqlen, dtype)
    ids = torch.randint(0, 256, (nsamples, seqlen))
    stream = Stream(model, list(ids.split(args.batch_size)), device)
    with stream.non_block_modules_on_device():
        stream.capture()
    block = find_blocks(model)[1][0].to(device)
    linears = find_linears(block)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t = {}
    with torch.no_grad():
        stream.forward_block(0, block, keep=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        stream.forward_block(0, block, keep=False)
        sync(device)
        t["forward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with HessianCollector(linears, hessian_dtype=args.hessian_dtype) as hc:
            stream.forward_block(0, block, keep=False)
        sync(device)
        t["hessians"] = time.perf_counter() - t0 - t["forward"]

        t["cholesky"] = t["solve"] = 0.0
        for name, mod in linears.items():
            W, H = get_weight(mod), hc.hessian(name)
            t0 = time.perf_counter()
            inverse_hessian_cholesky(H, 0.01)
            sync(device)
            chol = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = sparsegpt(W, H, 0.5 if pattern is None else pattern.sparsity, pattern)
            sync(device)
            t["cholesky"] += chol
            t["solve"] += time.perf_counter() - t0 - chol
            set_weight(mod, res.weight)

        t0 = time.perf_counter()
        stream.forward_block(0, block, keep=True)
        sync(device)
        t["propagate"] = time.perf_counter() - t0

    total = sum(t.values())
    if device.type == "cuda":
        gib = torch.cuda.max_memory_allocated(device) / 2**30
        peak = f"peak device memory {gib:.2f} GiB ({torch.cuda.get_device_name(device)})"
    else:
        gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak = f"peak RSS {gib:.2f} GiB (CPU, {torch.get_num_threads()} threads)"
    lines = [
        f"# bench_block: {args.preset} shape ({arch}, hidden {hidden}, inter {inter}, heads {heads}/{kv}), "
        f"{nsamples} x {seqlen} tokens, {args.dtype}, hessian {args.hessian_dtype}, {args.pattern}, device {device}, "
        f"torch {torch.__version__}, {platform.machine()}",
        f"{'phase':<10} {'seconds':>10} {'share':>7}",
        *[f"{k:<10} {v:>10.3f} {v / total:>7.1%}" for k, v in t.items()],
        f"{'block':<10} {total:>10.3f}",
        f"projection: {n_blocks} blocks x {total:.3f} s = {n_blocks * total / 60:.1f} min "
        f"(at {args.tokens} calibration tokens; the paper's 262144 scale the passes and Hessians linearly)",
        peak,
    ]
    default = Path(__file__).parent / "results" / f"bench_block_{args.preset}_{device.type}.txt"
    publish(lines, args.out or default)


if __name__ == "__main__":
    main()
