"""One process vs ``torchrun --nproc-per-node N`` on the same synthetic model: wall time and the report's
phases, the outputs compared; then a projection of per-block time with N GPUs from bench_block's phases.

On a 2-core CPU two processes share the same cores, so expect no speed-up here: the table shows where the
time goes and that the phases split. The projection assumes the forwards and Hessians split N ways (each
rank streams 1/N of the windows), the solves too in two-pass blocks (balanced by cost), plus one all-reduce
of every Hessian per block (NVLink-class bandwidth).

    python scripts/bench_torchrun.py [--nproc 2] [--layers 4] [--hidden 256] [--nsamples 16] [--seqlen 256]
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
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from llmprune.data import builtin_text_path

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=hidden, intermediate_size=3 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                  max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([builtin_text_path().read_text()[:300_000]], vocab_size=512, show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)


def run(cmd: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    report = json.loads((out / "llmprune.json").read_text())
    return {"wall": time.perf_counter() - t0, **report["timings"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "bench_torchrun_cpu.txt"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    make_model(tmp / "model", args.layers, args.hidden)
    common = ["compress", str(tmp / "model"), "--calib", "shakespeare", "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--device", "cpu"]
    rows = []
    for mode in ("--sequential", "--two-pass"):
        one = run([sys.executable, "-m", "llmprune", *common, mode, "--out", str(tmp / f"one{mode}")],
                  tmp / f"one{mode}")
        many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.nproc), "-m", "llmprune", *common, mode, "--out", str(tmp / f"many{mode}")],
                   tmp / f"many{mode}")
        rows.append((mode.strip("-"), one, many))
    lines = [f"# bench_torchrun: llama {args.layers} blocks, hidden {args.hidden}, {args.nsamples} x {args.seqlen}"
             f" calibration tokens, sparsegpt 50%, CPU ({os.cpu_count()} cores): 1 process vs torchrun"
             f" --nproc-per-node {args.nproc} (gloo)",
             f"{'order':11} {'procs':>5} {'wall s':>8} {'load s':>8} {'calib s':>8} {'prune s':>8} {'save s':>8}"]
    for mode, one, many in rows:
        for n, r in ((1, one), (args.nproc, many)):
            lines.append(f"{mode:11} {n:>5} {r['wall']:>8.1f} {r.get('load_s', 0):>8.2f}"
                         f" {r.get('calibration_s', 0):>8.2f} {r.get('prune_s', 0):>8.2f} {r.get('save_s', 0):>8.2f}")
    phases = {}
    block_file = RESULTS / "bench_block_tiny_cpu.txt"
    for line in block_file.read_text().splitlines() if block_file.is_file() else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("forward", "hessians", "cholesky", "solve", "propagate"):
            phases[parts[0]] = float(parts[1])
    if phases:
        lines.append(f"# projection from {block_file.name} (per block, seconds): data phases split N ways, solves"
                     " N ways in two-pass blocks")
        lines.append(f"{'N':>3} {'sequential':>11} {'two-pass':>9}")
        for n in (1, 2, 4, 8):
            data = (phases["forward"] + phases["hessians"]) / n
            solves = phases["cholesky"] + phases["solve"]
            seq = data + solves  # one forward; every rank solves each group in turn
            two = data + phases["propagate"] / n + solves / n
            lines.append(f"{n:>3} {seq:>11.3f} {two:>9.3f}")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
