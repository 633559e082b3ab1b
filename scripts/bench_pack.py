"""Packed 2:4 at inference: one linear through PyTorch's semi-structured sparse kernels vs dense, and a small
model's prefill throughput loaded with ``llmprune.load(..., semi_structured=True)`` vs dense.

Needs a CUDA GPU with sparse tensor cores (compute capability >= 8.0); elsewhere it says so and exits 0.
fp16, median ms of ``triton.testing.do_bench`` (or CUDA events).

    python scripts/bench_pack.py [--shapes 4096x4096,11008x4096] [--tokens 1,16,128,512,2048]
                                 [--model DIR_PACKED] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tables import publish  # scripts/tables.py
from torch import nn


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=100))


def linear_rows(shapes: list[tuple[int, int]], tokens: list[int]) -> list[str]:
    from torch.sparse import to_sparse_semi_structured

    from llmprune.pattern import Pattern
    from llmprune.solvers.masks import nm_mask

    rows = []
    for out_f, in_f in shapes:
        W = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        W = W.masked_fill(nm_mask(W.abs(), Pattern(2, 4)), 0)
        dense = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.float16)
        dense.weight.data.copy_(W)
        sparse = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.float16)
        sparse.weight = nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
        for t in tokens:
            x = torch.randn(max(t, 1), in_f, device="cuda", dtype=torch.float16)
            with torch.no_grad():
                torch.testing.assert_close(sparse(x), dense(x), rtol=2e-2, atol=2e-2)
                td = bench(lambda: dense(x))  # noqa: B023
                ts = bench(lambda: sparse(x))  # noqa: B023
            rows.append(f"{f'{out_f}x{in_f}':>14}{t:>8}{td:>12.4f}{ts:>12.4f}{td / ts:>9.2f}")
    return rows


def model_rows(directory: str, tokens: int) -> list[str]:
    from llmprune import load

    out = []
    for semi in (False, True):
        model, _ = load(directory, device="cuda", dtype="float16", semi_structured=semi)
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
        with torch.no_grad():
            ms = bench(lambda: model(input_ids=ids))  # noqa: B023
        out.append(f"{'semi-structured' if semi else 'dense':>16}{tokens:>8}{ms:>12.2f}{tokens / ms * 1000:>14.0f}")
        model = None  # free it before the next load
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--tokens", default="1,16,128,512,2048")
    ap.add_argument("--model", default=None, help="a packed 2:4 directory (fp16) for the prefill rows")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_pack_cuda.txt"))
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        print("bench_pack needs a CUDA GPU with compute capability >= 8.0 (sparse tensor cores); none here.")
        return
    card = torch.cuda.get_device_name()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    lines = [f"# bench_pack on {card}; torch {torch.__version__}; fp16; median ms",
             f"{'out x in':>14}{'tokens':>8}{'dense':>12}{'2:4 sparse':>12}{'speedup':>9}"]
    lines += linear_rows(shapes, tokens)
    if args.model:
        lines += ["", f"# prefill of {args.model}", f"{'weights':>16}{'tokens':>8}{'ms':>12}{'tokens/s':>14}"]
        lines += model_rows(args.model, args.prefill_tokens)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
