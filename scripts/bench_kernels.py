"""Fused Triton kernels vs their torch paths: the SparseGPT block loop and 2:4 packing.

On a CUDA GPU (the numbers that matter), per shape (rows x cols):
- one 128-column block: the solver on a one-block layer, torch loop vs fused kernel;
- a whole layer: SparseGPT 50% with the torch loop, with the fused kernel, and the layer's trailing GEMMs alone
  (the floor the fused solve should approach: target within 2x);
- pack24: the Triton kernel vs its torch twin.
Times are medians of ``triton.testing.do_bench``. On CPU the script runs small shapes through Triton's
interpreter (``TRITON_INTERPRET=1``, set here) to check it works; those timings mean nothing.

    python scripts/bench_kernels.py [--shapes 4096x4096,11008x4096,4096x11008,49152x12288] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from tables import publish  # scripts/tables.py

from llmprune.kernels.pack24 import pack24, pack24_torch  # noqa: E402
from llmprune.pattern import Pattern  # noqa: E402
from llmprune.solvers.hinv import inverse_hessian_cholesky  # noqa: E402
from llmprune.solvers.sparsegpt import sparsegpt  # noqa: E402

GPU_SHAPES = "4096x4096,11008x4096,4096x11008,49152x12288"
CPU_SHAPES = "32x128,48x256"


def bench(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=reps * 20))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def problem(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(cols, min(4 * cols, 8192), device=device)
    return torch.randn(rows, cols, device=device), X @ X.T / X.shape[1]


def trailing_gemms(W: torch.Tensor, Hinv: torch.Tensor, block: int) -> None:
    E = torch.randn(W.shape[0], block, device=W.device)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W[:, i2:] -= E[:, : i2 - i1] @ Hinv[i1:i2, i2:]


def measure(rows: int, cols: int, device: torch.device, pat: Pattern | None, block: int, reps: int) -> str:
    """One table row for a (rows, cols) layer."""
    W, H = problem(rows, cols, device)
    W1, H1 = W[:, :block].contiguous(), H[:block, :block].contiguous()
    bt = bench(lambda: sparsegpt(W1, H1, 0.5, pat, kernels="torch"), device, reps)
    bf = bench(lambda: sparsegpt(W1, H1, 0.5, pat, kernels="triton"), device, reps)
    lt = bench(lambda: sparsegpt(W, H, 0.5, pat, kernels="torch"), device, max(1, reps // 2))
    lf = bench(lambda: sparsegpt(W, H, 0.5, pat, kernels="triton"), device, max(1, reps // 2))
    Hinv, _, _ = inverse_hessian_cholesky(H, 0.01)
    Wg = W.clone()
    gm = bench(lambda: trailing_gemms(Wg, Hinv, block), device, reps)
    S = sparsegpt(W, H, 0.5, Pattern(2, 4), kernels="torch").weight.to(torch.float16)
    pt = bench(lambda: pack24_torch(S), device, reps)
    pf = bench(lambda: pack24(S), device, reps)
    return (f"{f'{rows}x{cols}':>14}{bt:>13.2f}{bf:>13.2f}{bt / bf:>7.1f}{lt:>13.1f}{lf:>13.1f}{gm:>10.1f}"
            f"{lf / gm:>12.2f}{pt:>12.2f}{pf:>12.2f}{pt / pf:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="rows x cols, comma separated")
    ap.add_argument("--pattern", default=None, help="N:M (default unstructured 50%%)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or (
        GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)).split(",")]
    pat = Pattern(*map(int, args.pattern.split(":"))) if args.pattern else None
    block = 128
    lines = [f"# bench_kernels on {card}; torch {torch.__version__}; pattern {pat or 'unstructured 50%'};"
             f" block {block}; median ms" + ("" if device.type == "cuda" else " (Triton INTERPRETER: not timings)"),
             f"{'rows x cols':>14}{'block torch':>13}{'block fused':>13}{'x':>7}{'layer torch':>13}"
             f"{'layer fused':>13}{'GEMMs':>10}{'fused/GEMM':>12}{'pack torch':>12}{'pack fused':>12}{'x':>7}"]
    print(lines[0], flush=True)
    print(lines[1], flush=True)
    for rows, cols in shapes:
        line = measure(rows, cols, device, pat, block, args.reps)
        print(line, flush=True)
        lines.append(line)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = args.out or Path(__file__).parent / "results" / f"bench_kernels_{device.type}.txt"
    print(f"-> {publish(lines, out, echo=False)}")  # the rows were printed as they came


if __name__ == "__main__":
    main()
