"""What torchrun reproduces of one process, measured on the real SmolLM2-135M: the same command alone and
under ``torchrun --nproc-per-node 2`` (gloo, CPU), outputs compared tensor by tensor.

Per Hessian dtype: how many tensors are identical, the masks' agreement (fraction of the pruned linears'
entries whose zero / non-zero agrees; the worst tensor and over all), the weights' relative difference
(‖W₂ − W₁‖ / ‖W₁‖: the worst tensor and over all linears), and the held-out perplexity of both (16 x 256
tokens of Shakespeare's held-out tail by default). ``--blocks K`` compresses the first K blocks only (the rest is kept
dense with ``--skip``; the test does that to stay short).

    python scripts/bench_torchrun_repro.py [--nsamples 16] [--seqlen 256] [--blocks 30] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tables import publish  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(one: Path, two: Path) -> dict:
    """How far ``two``'s weights are from ``one``'s: identical tensors, mask agreement and relative weight
    difference of the pruned linears (the worst tensor and all of them together)."""
    wa, wb = weights(one), weights(two)
    if wa.keys() != wb.keys():
        raise ValueError(f"different tensors: {sorted(wa.keys() ^ wb.keys())[:3]}")
    identical = sum(torch.equal(wa[k], wb[k]) for k in wa)
    pruned = [k for k in wa if wa[k].ndim == 2 and "layers." in k and bool((wa[k] == 0).any())]
    agree = total = 0
    worst_agree, worst_rel = 1.0, 0.0
    diff2 = norm2 = 0.0
    for k in pruned:
        a, b = wa[k].double(), wb[k].double()
        same = int(((a == 0) == (b == 0)).sum())
        agree, total = agree + same, total + a.numel()
        worst_agree = min(worst_agree, same / a.numel())
        d, n = float((a - b).norm()) ** 2, float(a.norm()) ** 2
        diff2, norm2 = diff2 + d, norm2 + n
        worst_rel = max(worst_rel, (d / max(n, 1e-300)) ** 0.5)
    return {"tensors": len(wa), "identical": identical, "pruned": len(pruned),
            "mask_agreement": agree / max(total, 1), "worst_mask_agreement": worst_agree,
            "rel_diff": (diff2 / max(norm2, 1e-300)) ** 0.5, "worst_rel_diff": worst_rel}


def total_blocks(model: str) -> int:
    """The model's decoder blocks: SmolLM2-135M has 30, a directory says in its config."""
    config = Path(model) / "config.json"
    return json.loads(config.read_text())["num_hidden_layers"] if config.is_file() else 30


def skip_after(blocks: int, total: int = 30) -> list[str]:
    """--skip for every linear of blocks ``blocks`` .. ``total`` - 1."""
    rest = "|".join(str(i) for i in range(blocks, total))
    return ["--skip", rf"model\.layers\.({rest})\."] if rest else []


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def run_pair(base: list[str], out: Path, timeout: int = 3600) -> tuple[float, float]:
    """``base`` alone into out/one and under torchrun (2 gloo processes) into out/two: their wall seconds."""
    times = []
    for name, prefix in (("one", [sys.executable, "-m", "llmprune"]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "2", "-m", "llmprune"])):
        t0 = time.perf_counter()
        done = subprocess.run([*prefix, *base, "--out", str(out / name)], capture_output=True, text=True,
                              timeout=timeout, env=_env())
        if done.returncode:
            raise RuntimeError(f"{name}: {done.stderr[-3000:]}")
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def held_out_ppl(directory: Path, windows: int, seqlen: int) -> float:
    from llmprune.api import evaluate

    return evaluate(directory, "shakespeare", split="test", seqlen=seqlen, max_windows=windows, device="cpu",
                    progress=False)["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="SmolLM2-135M as llmprune names it, or a copy of it")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hessian-dtypes", default="fp32,fp64")
    ap.add_argument("--extra", default="", help="more compress options, e.g. '--wbits 4 --group-size 64'")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "torchrun_repro.txt"))
    ap.add_argument("--json", default=None, help="also write the rows here as JSON (the test reads them)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmprune-repro-"))
    name = "SmolLM2-135M" if args.model == "smollm2-135m" else args.model
    total = total_blocks(args.model)
    args.blocks = min(args.blocks, total)
    lines = [f"# bench_torchrun_repro: {name}, sparsegpt 50% sequential {args.extra}, {args.nsamples} x"
             f" {args.seqlen} Shakespeare (train) calibration tokens, first {args.blocks} of {total} blocks compressed,"
             f" --dtype {args.dtype}; 1 process vs torchrun --nproc-per-node 2 (gloo, CPU, {os.cpu_count()} cores);"
             f" held-out ppl: {args.eval_windows} x {args.eval_seqlen} tokens of the test part",
             f"{'hessian':>7} {'identical':>10} {'mask agree':>11} {'worst mask':>11} {'rel diff':>9}"
             f" {'worst rel':>9} {'ppl 1':>8} {'ppl 2':>8} {'ratio':>7} {'wall 1 s':>8} {'wall 2 s':>8}"]
    rows = []
    for hd in args.hessian_dtypes.split(","):
        base = ["compress", args.model, "--calib", "shakespeare", "--split", "train", "--nsamples",
                str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "--dtype", args.dtype,
                "--hessian-dtype", hd, *skip_after(args.blocks, total), *args.extra.split()]
        out = tmp / hd
        try:
            t1, t2 = run_pair(base, out)
            c = compare(out / "one", out / "two")
            p1 = p2 = held_out_ppl(out / "one", args.eval_windows, args.eval_seqlen)
            if c["identical"] < c["tensors"]:  # else the same model: the same perplexity
                p2 = held_out_ppl(out / "two", args.eval_windows, args.eval_seqlen)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append({"hessian_dtype": hd, **c, "ppl_one": p1, "ppl_two": p2, "wall_one": t1, "wall_two": t2})
        lines.append(f"{hd:>7} {c['identical']:>4}/{c['tensors']:<5} {c['mask_agreement']:>11.6f}"
                     f" {c['worst_mask_agreement']:>11.6f} {c['rel_diff']:>9.2e} {c['worst_rel_diff']:>9.2e}"
                     f" {p1:>8.3f} {p2:>8.3f} {p2 / p1:>7.4f} {t1:>8.1f} {t2:>8.1f}")
        print(lines[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    publish(lines, args.out, echo=False)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
