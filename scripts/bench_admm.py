"""ADMM, refit and OBC against SparseGPT on SmolLM2-135M: held-out perplexity and wall time, same windows.

Calibration on the Shakespeare train part, perplexity on its held-out tail; every row uses the same windows,
in one process (read the time ratios, the machine is shared). Rows: SparseGPT vs admm at 50%, 70% and 2:4;
admm with OWL and with SPDY at 70%; wanda and magnitude with and without --refit; joint 50% + w4g64 vs SparseGPT then
round-to-nearest on the same grid (the two-stage recipe of llm-compressor).

    python scripts/bench_admm.py [--nsamples 32] [--seqlen 512] [--rows NAME,...]

With ``--alps-ref PATH`` (the ALPS authors' alps.py, mazumder-lab/ALPS; never stored here) the rows "alps-ref
50%", "alps-ref 70%" and "alps-ref 2:4" run its ALPS_admm(rho=0.1) on every linear as their llama.py drives it:
every linear's Hessian from the dense block's inputs, then the block re-run (llmprune's two-pass order,
sequential=False), its hard-coded cuda:0 mapped to the CPU. ``--blocks N`` compresses only the first N blocks
(the reference's solves cost minutes per block on a small CPU).

    python scripts/bench_admm.py --alps-ref /path/to/alps.py --rows "alps-ref 70%,admm 70%" --blocks 10 \
        --out scripts/results/bench_admm_ref.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import types
import unittest.mock
from pathlib import Path

import torch
from smollm2 import CPU, setup  # scripts/smollm2.py
from tables import publish  # scripts/tables.py

from llmprune.compression import compress_model
from llmprune.perplexity import perplexity
from llmprune.quant import QuantSpec, rtn
from llmprune.solvers import SOLVERS, SolveResult

ROWS = {
    "sparsegpt 50%": dict(sparsity=0.5),
    "admm 50%": dict(method="admm", sparsity=0.5),
    "sparsegpt 70%": dict(sparsity=0.7),
    "admm 70%": dict(method="admm", sparsity=0.7),
    "sparsegpt 2:4": dict(pattern="2:4"),
    "admm 2:4": dict(method="admm", pattern="2:4"),
    "admm 70% two-pass": dict(method="admm", sparsity=0.7, sequential=False),
    "alps-ref 50%": dict(method="admm", sparsity=0.5, sequential=False),
    "alps-ref 70%": dict(method="admm", sparsity=0.7, sequential=False),
    "alps-ref 2:4": dict(method="admm", pattern="2:4", sequential=False),
    "sparsegpt 70% owl": dict(sparsity=0.7, allocation="owl"),
    "admm 70% owl": dict(method="admm", sparsity=0.7, allocation="owl"),
    "sparsegpt 70% spdy": dict(sparsity=0.7, allocation="spdy"),
    "admm 70% spdy": dict(method="admm", sparsity=0.7, allocation="spdy"),
    "wanda 50%": dict(method="wanda", sparsity=0.5),
    "wanda 50% + refit": dict(method="wanda", sparsity=0.5, refit=True),
    "magnitude 50%": dict(method="magnitude", sparsity=0.5),
    "magnitude 50% + refit": dict(method="magnitude", sparsity=0.5, refit=True),
    "sparsegpt 50% + w4g64 joint": dict(sparsity=0.5, wbits=4, group_size=64),
    "sparsegpt 50% then rtn w4g64": dict(sparsity=0.5),  # rounded after, below
}


def load_reference(path: str) -> types.ModuleType:
    """The reference alps.py as a module, its hard-coded cuda:0 mapped to the CPU (the only change)."""
    src = Path(path).read_text().replace("'cuda:0'", "'cpu'").replace("torch.cuda.synchronize()", "pass")
    mod = types.ModuleType("alps_reference")
    exec(compile(src, path, "exec"), mod.__dict__)  # noqa: S102 (the user's own file, named on the command line)
    return mod


def reference_solver(alps: types.ModuleType):
    """A solver (llmprune's signature) that runs the reference's ALPS_admm(rho=0.1) on one linear."""

    def solve(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern=None, quant=None, **_: object) -> SolveResult:
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.float().clone()
        pruner = alps.ALPS_prune(layer, 0, 0)
        pruner.XtX = H.float().clone()  # its scale cancels in ALPS' normalization
        pruner.ALPS_admm(sp=sparsity, nm_n=pattern.n if pattern else 0, nm_m=pattern.m if pattern else 0, rho=0.1)
        weight = layer.weight.data.to(W.dtype)
        return SolveResult(weight=weight, mask=weight == 0)

    return solve


def round_after(model: torch.nn.Module, report: dict, spec: QuantSpec) -> None:
    """The two-stage recipe: every compressed linear rounded to nearest on its own grids (zeros stay zero)."""
    names = {r["name"] for r in report["layers"]}
    for name, mod in model.named_modules():
        if name in names:
            mod.weight.data.copy_(rtn(mod.weight.data, spec)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--rows", default=",".join(r for r in ROWS if not r.startswith("alps-ref")))
    ap.add_argument("--alps-ref", default=None, help="path to the ALPS authors' alps.py (for the alps-ref rows)")
    ap.add_argument("--blocks", type=int, default=None, help="compress only the first N blocks")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_admm.txt"))
    args = ap.parse_args()

    model, tokenizer, pristine, base, windows, held_out = setup(args.nsamples, args.seqlen, args.eval_windows)
    cpu = CPU
    rows = args.rows.split(",")
    if any(r.startswith("alps-ref") for r in rows) and not args.alps_ref:
        ap.error("the alps-ref rows need --alps-ref /path/to/alps.py")
    reference = reference_solver(load_reference(args.alps_ref)) if args.alps_ref else None
    n_blocks = len(model.model.layers)
    if args.blocks is not None and args.blocks < n_blocks:
        base = base.replace(skip=(rf"\.layers\.({'|'.join(map(str, range(args.blocks, n_blocks)))})\.",))
    dense = perplexity(model, held_out, cpu, progress=False)
    results: dict[str, tuple[float, float, float]] = {}
    for name in rows:
        model.load_state_dict(pristine)
        recipe = base.replace(**ROWS[name])
        solvers = {"admm": reference} if name.startswith("alps-ref") else {}
        t0 = time.perf_counter()
        with unittest.mock.patch.dict(SOLVERS, solvers):
            report = compress_model(model, tokenizer, recipe.resolve(), windows, progress=False)
        if name.endswith("then rtn w4g64"):
            round_after(model, report, QuantSpec(4, 64, True, "minmax"))
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, held_out, cpu, progress=False)
        results[name] = (report["global_sparsity"], ppl, seconds)
        print(f"{name:<30} {ppl:9.3f} {seconds:8.1f} s", flush=True)

    def ratio(a: str, b: str, col: int) -> str:
        return f"{results[a][col] / results[b][col]:.3f}" if a in results and b in results else "-"

    blocks = f"the first {args.blocks} of {n_blocks} blocks" if args.blocks else f"all {n_blocks} blocks"
    lines = [
        f"# bench_admm: SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} Shakespeare (train part),"
        f" held-out {held_out.shape[0]} x {args.seqlen} (dense ppl {dense:.3f}); CPU, {os.cpu_count()} cores,"
        f" {platform.machine()}, torch {torch.__version__}; {blocks} compressed; sequential order (the default)"
        " unless the row says two-pass",
        *(["# alps-ref: the ALPS authors' alps.py (" + Path(args.alps_ref).name + ", mazumder-lab/ALPS) run from"
           " the path given, ALPS_admm(rho=0.1) per linear in their llama.py's order (two-pass), cuda:0 mapped"
           " to the CPU"] if reference else []),
        f"{'recipe':<30} {'zeros':>7} {'ppl':>9} {'compress s':>11}",
        *(f"{n:<30} {z:>7.2%} {p:>9.3f} {s:>11.1f}" for n, (z, p, s) in results.items()),
        "# ratios (ppl, wall): admm/sparsegpt 50% " + ratio("admm 50%", "sparsegpt 50%", 1)
        + f" {ratio('admm 50%', 'sparsegpt 50%', 2)}; 70% " + ratio("admm 70%", "sparsegpt 70%", 1)
        + f" {ratio('admm 70%', 'sparsegpt 70%', 2)}; 2:4 " + ratio("admm 2:4", "sparsegpt 2:4", 1)
        + f" {ratio('admm 2:4', 'sparsegpt 2:4', 2)}; admm+owl 70% / sparsegpt 70% "
        + ratio("admm 70% owl", "sparsegpt 70%", 1) + "; admm+spdy 70% / sparsegpt 70% "
        + ratio("admm 70% spdy", "sparsegpt 70%", 1) + f" {ratio('admm 70% spdy', 'sparsegpt 70%', 2)}"
        + "; joint / sparsegpt-then-rtn " + ratio("sparsegpt 50% + w4g64 joint", "sparsegpt 50% then rtn w4g64", 1),
    ]
    if reference:
        lines.append("# ratios (ppl, wall): admm / alps-ref " + "; ".join(
            f"{lvl} {ratio(f'admm {lvl}', f'alps-ref {lvl}', 1)} {ratio(f'admm {lvl}', f'alps-ref {lvl}', 2)}"
            for lvl in ("50%", "70%", "2:4")) + "; admm 70% two-pass / alps-ref 70% "
            + ratio("admm 70% two-pass", "alps-ref 70%", 1) + " " + ratio("admm 70% two-pass", "alps-ref 70%", 2))
    publish(lines, args.out)


if __name__ == "__main__":
    main()
