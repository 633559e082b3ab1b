"""Under torchrun, how a streamed model's blocks reach every rank: each rank reads the shards itself
(``--dist-read all``) or rank 0 reads and broadcasts (``--dist-read rank0``). Times the block loads alone
(BlockSource.load, every byte touched, release; for every block, ranks in step), best of ``--repeat``, on a
synthetic llama.

Here the shards sit on one local disk in the page cache, and gloo carries the broadcast over loopback TCP:
a lower bound for reading, an upper bound for broadcasting. On a cluster, shared-file-system reads are
slower and NCCL over NVLink faster, so measure there before choosing.

    python scripts/bench_dist_read.py [--nproc 2] [--layers 8] [--hidden 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import publish  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_model(d: Path, layers: int, hidden: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(d, max_shard_size="100MB")


def worker(model_dir: str, repeat: int) -> None:
    """One rank: load every block in each mode, in step with the others; rank 0 prints the timings."""
    from llmprune import distributed
    from llmprune.arch import find_blocks
    from llmprune.lazy import load_lazy

    distributed.init("cpu")
    model, _ = load_lazy(Path(model_dir))
    source = model.block_source
    _, blocks = find_blocks(model)
    nbytes = 0
    out = {}
    for mode in ("all", "rank0"):
        source.read_on_main = mode == "rank0"
        best = float("inf")
        for _ in range(repeat):
            distributed.barrier()
            t0 = time.perf_counter()
            for i, block in enumerate(blocks):
                source.load(i, block)
                state = block.state_dict()
                for t in state.values():  # a read tensor may be a memory map: touch every byte, as a forward does
                    t.sum()
                nbytes = sum(t.numel() * t.element_size() for t in state.values())
                source.release(i, block)
            distributed.barrier()
            best = min(best, time.perf_counter() - t0)
        out[mode] = best / len(blocks)
    if distributed.is_main():
        print(json.dumps({"per_block_s": out, "block_bytes": nbytes, "blocks": len(blocks)}))
    distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "bench_dist_read_cpu.txt"))
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.repeat)
    tmp = Path(tempfile.mkdtemp())
    make_model(tmp / "model", args.layers, args.hidden)
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    rows = {}
    for n in (1, args.nproc):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               __file__, "--worker", str(tmp / "model"), "--repeat", str(args.repeat)] if n > 1 else \
              [sys.executable, __file__, "--worker", str(tmp / "model"), "--repeat", str(args.repeat)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        rows[n] = json.loads(done.stdout.strip().splitlines()[-1])
    mb = rows[1]["block_bytes"] / 2**20
    lines = [f"# bench_dist_read: llama {args.layers} blocks, hidden {args.hidden}, {mb:.0f} MiB per block"
             f" (fp32), shards on a local disk (page cache), CPU ({os.cpu_count()} cores), gloo; best of"
             f" {args.repeat}",
             f"{'procs':>5} {'--dist-read':>11} {'s/block':>8} {'MiB/s per rank':>15}"]
    for n, r in rows.items():
        for mode, s in r["per_block_s"].items():
            if n == 1 and mode == "rank0":
                continue  # alone, both modes are the same read
            lines.append(f"{n:>5} {mode:>11} {s:>8.3f} {mb / s:>15.0f}")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
