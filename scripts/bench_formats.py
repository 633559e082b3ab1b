"""The formats serving GPUs run (FP8 W8A8, NVFP4, MXFP4, W4A16), llmprune's GPTQ against llm-compressor's RTN and
GPTQ on SmolLM2-135M; joint 50% + NVFP4 against llm-compressor's SparseGPT then NVFP4; spdy's mixed 3-bit average
against uniform 3-bit. Held-out perplexity and checkpoint size, the same windows for every row.

Every row writes a compressed-tensors checkpoint, and every perplexity is of that checkpoint, read the same way
for both tools: by transformers where it quantizes activations (applied at run time, as a runtime does), else its
linears decoded by llmprune's reader into the float32 model.
llm-compressor runs in the benchmark's own venv (``--venv``, as scripts/bench_peers.py makes it), from the same
model directory and the same calibration token ids; llmprune's calibration windows are the same ids (checked by
their hash). Both compute in float32 (llmprune ``--dtype float32``, llm-compressor the directory's own).

    python scripts/bench_formats.py [--nsamples 32] [--seqlen 512] [--rows NAME,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_peers import ensure_venv  # scripts/bench_peers.py
from smollm2 import peer_setup  # scripts/smollm2.py
from tables import publish  # scripts/tables.py

HERE = Path(__file__).parent

# name -> (tool, arguments): llmprune's are CLI flags, llm-compressor's llmc_run.py's
ROWS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),
    "fp8 w8a8 llmprune gptq": ("llmprune", ["--scheme", "FP8_DYNAMIC"]),
    "fp8 w8a8 llmc rtn": ("llmc", ["--method", "rtn", "--scheme", "FP8_DYNAMIC"]),
    "fp8 w8a8 llmc gptq": ("llmc", ["--method", "gptq", "--scheme", "FP8_DYNAMIC"]),
    "nvfp4 llmprune gptq": ("llmprune", ["--scheme", "NVFP4A16"]),
    "nvfp4 llmc rtn": ("llmc", ["--method", "rtn", "--scheme", "NVFP4A16"]),
    "nvfp4 llmc gptq": ("llmc", ["--method", "gptq", "--scheme", "NVFP4A16"]),
    "mxfp4 llmprune gptq": ("llmprune", ["--scheme", "MXFP4A16"]),
    "mxfp4 llmc rtn": ("llmc", ["--method", "rtn", "--scheme", "MXFP4A16"]),
    "mxfp4 llmc gptq": ("llmc", ["--method", "gptq", "--scheme", "MXFP4A16"]),
    "w4a16 g128 llmprune gptq": ("llmprune", ["--scheme", "W4A16"]),
    "w4a16 g128 llmc rtn": ("llmc", ["--method", "rtn", "--scheme", "W4A16"]),
    "w4a16 g128 llmc gptq": ("llmc", ["--method", "gptq", "--scheme", "W4A16"]),
    "50% + nvfp4 llmprune joint": ("llmprune", ["--scheme", "NVFP4A16", "--sparsity", "0.5"]),
    "50% + nvfp4 llmc sparsegpt then rtn": ("llmc", ["--method", "sparsegpt-then-rtn", "--scheme", "NVFP4A16",
                                                     "--sparsity", "0.5"]),
    # g64: SmolLM2's 576 inputs are not a multiple of 128
    "3-bit g64 uniform llmprune gptq": ("llmprune", ["--wbits", "3", "--group-size", "64"]),
    "3-bit g64 mixed 2/3/4/8 llmprune spdy": ("llmprune", ["--wbits", "3", "--group-size", "64", "--allocation",
                                                          "spdy", "--bits-choices", "2,3,4,8"]),
}

# (row, its reference row(s), the target ratio) for the summary
TARGETS = [
    ("fp8 w8a8 llmprune gptq", ["dense"], 1.01),
    ("nvfp4 llmprune gptq", ["nvfp4 llmc rtn", "nvfp4 llmc gptq"], 0.97),
    ("mxfp4 llmprune gptq", ["mxfp4 llmc rtn", "mxfp4 llmc gptq"], 0.97),
    ("w4a16 g128 llmprune gptq", ["w4a16 g128 llmc rtn", "w4a16 g128 llmc gptq"], None),
    ("50% + nvfp4 llmprune joint", ["50% + nvfp4 llmc sparsegpt then rtn"], 0.95),
    ("3-bit g64 mixed 2/3/4/8 llmprune spdy", ["3-bit g64 uniform llmprune gptq"], 0.85),
]


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def load_checkpoint(directory: Path, base: Path) -> torch.nn.Module:
    """A compressed-tensors checkpoint as it runs. With activation quantization: transformers' own loader (it
    quantizes the inputs at run time). Weight-only: the base model in float32 with each compressed linear
    decoded by llmprune's reader (bit-identical to compressed-tensors' decompression, tests/test_formats.py),
    as transformers keeps FP4 linears compressed on CPU and decompresses them to bf16 at each forward."""
    from transformers import AutoModelForCausalLM

    from llmprune.checkpoint import Source

    qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    if any(g.get("input_activations") for g in (qc.get("config_groups") or {}).values()):
        return AutoModelForCausalLM.from_pretrained(directory).eval()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if qc:
        source = Source(directory)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and f"{name}.weight_scale" in source.reader:
                m.weight.data = source.weight(name)[0].to(torch.float32)
    return model


def perplexity_of(directory: Path, base: Path, ev: torch.Tensor) -> float:
    """Held-out perplexity of a checkpoint (``load_checkpoint``): a plain loop, the same for every row."""
    import torch.nn.functional as F

    model = load_checkpoint(directory, base)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, ev.shape[0], 4):
            ids = ev[b : b + 4]
            logits = model(ids).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--venv", default=str(Path.home() / ".cache" / "llmprune-bench" / "llmc"))
    ap.add_argument("--out", default=str(HERE / "results" / "bench_formats.txt"))
    args = ap.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}: choose from {list(ROWS)}")
    py = ensure_venv(Path(args.venv).expanduser()) if any(ROWS[r][0] == "llmc" for r in rows) else None


    work = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    results: dict[str, dict] = {}
    try:
        model_dir, _, _, calib, ev = peer_setup(work, args.nsamples, args.seqlen, args.eval_windows, "float32")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        common = ["--calib", "shakespeare", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                  "--device", "cpu", "--dtype", "float32", "--format", "compressed-tensors", "--overwrite"]
        for name in rows:
            tool, extra = ROWS[name]
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            if tool == "dense":
                out = model_dir
            elif tool == "llmprune":
                cmd = [sys.executable, "-m", "llmprune", "compress", str(model_dir), "--out", str(out), *common, *extra]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:  # e.g. a group size that does not divide a layer: say so, go on
                    err = (done.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{name:<42} failed: {err}", flush=True)
                    results[name] = {"error": err[:100]}
                    continue
                report = json.loads((out / "llmprune.json").read_text())
                if report["calibration"]["sha256"] != calib["sha256"]:
                    raise SystemExit(f"{name}: llmprune calibrated on other windows than the peer")
            else:
                cmd = [str(py), str(HERE / "peers" / "llmc_run.py"), "--model", str(model_dir), "--windows",
                       str(work / "windows.pt"), "--out", str(out), *extra]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    err = (done.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{name:<42} failed: {err}", flush=True)
                    results[name] = {"error": err[:100]}
                    continue
            seconds = time.perf_counter() - t0
            ppl = perplexity_of(out, model_dir, ev)
            results[name] = {"ppl": ppl, "bytes": checkpoint_bytes(out), "seconds": seconds}
            print(f"{name:<42} {ppl:9.3f} {results[name]['bytes'] / 2**20:8.1f} MiB {seconds:7.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"# bench_formats: SmolLM2-135M (float32), calibration {args.nsamples} x {args.seqlen} Shakespeare"
        f" (train part, sha256 {calib['sha256'][:12]}), held-out {ev.shape[0]} x {ev.shape[1]}; every perplexity is"
        f" of the compressed-tensors checkpoint (transformers for W8A8, llmprune's reader for weight-only); CPU,"
        f" {os.cpu_count()} cores,"
        f" {platform.machine()}, torch {torch.__version__}; llm-compressor from {args.venv}",
        f"{'row':<42} {'ppl':>9} {'checkpoint MiB':>15} {'wall s':>8}",
        *(f"{n:<42} {r['ppl']:>9.3f} {r['bytes'] / 2**20:>15.1f} {r['seconds']:>8.1f}" if "ppl" in r
          else f"{n:<42} failed: {r['error']}" for n, r in results.items()),
    ]
    for row, refs, target in TARGETS:
        have = [r for r in refs if "ppl" in results.get(r, {})]
        if "ppl" not in results.get(row, {}) or not have:
            continue
        best = min(have, key=lambda r: results[r]["ppl"])
        ratio = results[row]["ppl"] / results[best]["ppl"]
        goal = f" (target <= {target})" if target else ""
        lines.append(f"# {row} / {best}: {ratio:.3f}{goal}")
    if "3-bit g64 mixed 2/3/4/8 llmprune spdy" in results:
        lines.append("# the mixed row's average is at most 3 code bits per weight (its report's allocation)")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
