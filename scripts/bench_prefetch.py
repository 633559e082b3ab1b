"""What prefetching the next block buys: a synthetic Llama-shaped model streamed from disk through the engine,
with and without ``prefetch`` (llmprune/prefetch.py), same process, same files.

Per block the engine runs the block over the calibration batches twice (as compress does: the Hessian pass
and the propagation pass, here without the solves), so the figure is the share of reading + copying a block
that the overlap hides. Files are read once before timing (page cache warm: this measures the copy path, not
the disk). Meaningful on a GPU; on CPU it shows the overhead of the worker thread.

    python scripts/bench_prefetch.py [--layers 8 --hidden 2048 --inter 5632] [--tokens 8192] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_memory import add_shape_options, write_model  # scripts/bench_memory.py
from tables import publish  # scripts/tables.py

from llmprune.engine import Stream, default_device
from llmprune.lazy import load_lazy


def stream_once(model_dir: Path, ids: torch.Tensor, batch: int, device: torch.device, prefetch: bool) -> float:
    model, _ = load_lazy(model_dir)
    stream = Stream(model, list(ids.split(batch)), device, prefetch=prefetch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    stream.run(lambda i, block, forward_all: forward_all(), desc=f"prefetch={prefetch}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_options(ap, layers=8, hidden=1024, inter=2816)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (in windows of --seqlen)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device(args.device) if args.device else default_device()
    root = Path(tempfile.mkdtemp(prefix="llmprune-prefetch-"))
    try:
        params = write_model(root / "model", args.layers, args.hidden, args.inter, args.vocab, args.heads)
        ids = torch.randint(0, min(1000, args.vocab), (max(1, args.tokens // args.seqlen), args.seqlen),
                            generator=torch.Generator().manual_seed(0))
        stream_once(root / "model", ids, args.batch, device, False)  # warm the page cache and the device
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeat):
            for prefetch in (False, True):  # interleaved: the machine's drift hits both
                times[prefetch].append(stream_once(root / "model", ids, args.batch, device, prefetch))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {p: min(t) for p, t in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    block_mib = 2 * (4 * args.hidden**2 + 3 * args.hidden * args.inter) / 2**20
    lines = [
        f"# bench_prefetch: synthetic llama {args.layers} x (hidden {args.hidden}, mlp {args.inter}), bf16,"
        f" {params / 1e9:.2f} B params, block {block_mib:.0f} MiB; {ids.numel()} tokens, two passes per block;"
        f" {name}, torch {torch.__version__}; best of {args.repeat}",
        f"{'prefetch':<10} {'seconds':>9} {'s/block':>9}",
        *[f"{str(p):<10} {best[p]:>9.2f} {best[p] / args.layers:>9.3f}" for p in (False, True)],
        f"ratio with / without prefetch: {best[True] / best[False]:.2f}",
    ]
    default = Path(__file__).parent / "results" / f"bench_prefetch_{device.type}.txt"
    publish(lines, args.out or default)


if __name__ == "__main__":
    main()
