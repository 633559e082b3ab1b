"""llmprune against llm-compressor on this machine, in one alternated run: SparseGPT 50% on SmolLM2-135M,
the same model directory and the same calibration windows for both, load and save included; plus, for
llmprune alone in the same run, admm's wall against sparsegpt's and eval-ppl's against a plain transformers
loop over the same evaluation windows.

llm-compressor lives in the benchmark's own venv (``--venv``, created with ``--system-site-packages`` and
``pip install llmcompressor`` when missing), never in llmprune's dependencies. Rounds alternate the order of
the tools, so read the ratios (this machine is shared and noisy).

    python scripts/bench_peers.py [--nsamples 32] [--seqlen 512] [--rounds 2] [--venv ~/.cache/llmprune-bench/llmc]
                                  [--out scripts/results/bench_peers.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from smollm2 import peer_setup  # scripts/smollm2.py
from tables import publish  # scripts/tables.py

HERE = Path(__file__).parent
LOOP = '''
import math, sys, time, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto").eval()
windows = torch.load(sys.argv[2])
nll = []
with torch.no_grad():
    for b in range(0, windows.shape[0], 4):
        ids = windows[b : b + 4]
        logits = model(ids).logits.float()
        for i in range(ids.shape[0]):
            nll.append(float(F.cross_entropy(logits[i, :-1], ids[i, 1:])))
print(math.exp(sum(nll) / len(nll)), time.perf_counter() - t0)
'''


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode == 0
    if not ok:
        print(f"creating {venv} with llmcompressor (its own venv, over the installed packages)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llmcompressor"], check=True)
    return py


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--venv", default=str(Path.home() / ".cache" / "llmprune-bench" / "llmc"))
    ap.add_argument("--dtype", default="auto", help="llmprune's --dtype (the peer loads the directory's own)")
    ap.add_argument("--skip", default="", help="comma separated rows to leave out: llmc, admm, eval")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_peers.txt"))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    py = ensure_venv(Path(args.venv).expanduser()) if "llmc" not in skip else None

    from llmprune.data import windows_hash

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        model_dir, tok, windows, calib, ev = peer_setup(work, args.nsamples, args.seqlen, args.eval_windows)
        torch.save(ev, work / "eval.pt")

        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        common = ["--calib", "shakespeare", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                  "--device", "cpu", "--overwrite", "--dtype", args.dtype]
        rows: dict[str, list[dict]] = {}

        def llmprune_run(method: str) -> dict:
            out = work / f"out-{method}"
            wall, _ = timed([sys.executable, "-m", "llmprune", "compress", str(model_dir), "--method", method,
                             "--sparsity", "0.5", "--out", str(out), *common], env)
            report = json.loads((out / "llmprune.json").read_text())
            assert report["calibration"]["sha256"] == windows_hash(windows), "llmprune saw other windows"
            t = report["timings"]
            solve = sum(r["seconds"] for r in report["layers"])
            err = sum(r.get("error_seconds") or 0.0 for r in report["layers"])
            return {"wall": wall, "load": t["load_s"], "calibration": t["calibration_s"],
                    "forward+hessians": t["prune_s"] - solve - err, "solves": solve, "errors": err,
                    "write": t.get("save_s", 0.0), "sparsity": report["global_sparsity"]}

        def llmc_run() -> dict:
            out = work / "out-llmc"
            shutil.rmtree(out, ignore_errors=True)
            wall, stdout = timed([str(py), str(HERE / "peers" / "llmc_run.py"), "--model", str(model_dir),
                                  "--windows", str(work / "windows.pt"), "--out", str(out)], env)
            r = json.loads(stdout.strip().splitlines()[-1])
            return {"wall": wall, "load": r["import_s"] + r["load_s"], "compress": r["compress_s"],
                    "write": r["save_s"], "sparsity": r["sparsity"]}

        def eval_runs(r: int) -> None:
            """eval-ppl (the directory's own dtype, as it evaluates) and the loop, in alternating order."""
            for which in (("llmprune", "loop") if r % 2 == 0 else ("loop", "llmprune")):
                if which == "llmprune":
                    wall, stdout = timed([sys.executable, "-m", "llmprune", "eval-ppl", str(model_dir), "--dataset",
                                          "shakespeare", "--seqlen", str(args.seqlen), "--max-windows",
                                          str(args.eval_windows), "--device", "cpu"], env)
                    ppl = float(stdout.split("perplexity ")[1].split()[0])
                    rows.setdefault("llmprune eval-ppl", []).append({"wall": wall, "ppl": ppl})
                else:
                    wall, stdout = timed([sys.executable, "-c", LOOP, str(model_dir), str(work / "eval.pt")], env)
                    rows.setdefault("transformers loop", []).append({"wall": wall, "ppl": float(stdout.split()[0])})

        for r in range(args.rounds):
            order = ["llmprune", "llmc"] if r % 2 == 0 else ["llmc", "llmprune"]
            for tool in order:
                if tool == "llmprune":
                    print(f"round {r + 1}: llmprune sparsegpt", flush=True)
                    rows.setdefault("llmprune sparsegpt", []).append(llmprune_run("sparsegpt"))
                elif "llmc" not in skip:
                    print(f"round {r + 1}: llm-compressor sparsegpt", flush=True)
                    rows.setdefault("llm-compressor sparsegpt", []).append(llmc_run())
            if "admm" not in skip:
                print(f"round {r + 1}: llmprune admm", flush=True)
                rows.setdefault("llmprune admm", []).append(llmprune_run("admm"))
            if "eval" not in skip:
                print(f"round {r + 1}: eval-ppl and the transformers loop", flush=True)
                eval_runs(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[name])

    lines = [f"# bench_peers: smollm2-135m, SparseGPT 50%, {args.nsamples} x {args.seqlen} calibration tokens"
             f" (sha256 {calib['sha256'][:12]}), llmprune --dtype {args.dtype}, {args.rounds} alternated rounds,"
             f" torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads",
             "", "| run | wall s (median) | phases (median s) | sparsity / perplexity |", "| --- | --- | --- | --- |"]
    for name, runs in rows.items():
        keys = [k for k in runs[0] if k not in ("wall", "sparsity", "ppl")]
        phases = ", ".join(f"{k} {med(name, k):.1f}" for k in keys)
        extra = f"{runs[0]['sparsity']:.4f}" if "sparsity" in runs[0] else f"ppl {runs[0]['ppl']:.3f}"
        lines.append(f"| {name} | {med(name, 'wall'):.1f} | {phases} | {extra} |")
    lines.append("")
    if "llm-compressor sparsegpt" in rows:
        lines.append(f"llmprune / llm-compressor wall (sparsegpt 50%, load and write included):"
                     f" {med('llmprune sparsegpt', 'wall') / med('llm-compressor sparsegpt', 'wall'):.3f}")
    if "llmprune admm" in rows:
        lines.append(f"admm / sparsegpt wall: {med('llmprune admm', 'wall') / med('llmprune sparsegpt', 'wall'):.3f}")
    if "transformers loop" in rows:
        lines.append(f"eval-ppl / transformers loop wall: "
                     f"{med('llmprune eval-ppl', 'wall') / med('transformers loop', 'wall'):.3f}")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
