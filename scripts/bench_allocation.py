"""Per-layer sparsity allocations judged on text they were not calibrated on: SmolLM2-135M, SparseGPT,
uniform / owl / owl with --owl-lambda auto / spdy, calibrated (a) on the built-in text's train part and (b) on
a second kind of English text (the docstrings of a fixed list of Python standard-library modules: technical prose, made
reproducibly from this Python), evaluated on the built-in text's held-out part. One process, the same
windows for every row; wall times are whole compress runs, allocation search included.

    python scripts/bench_allocation.py [--sparsities 0.7,0.6] [--nsamples 128] [--seqlen 256] [--spdy-samples 4]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from smollm2 import CPU, setup  # noqa: E402
from tables import publish  # noqa: E402

from llmprune.calibration import calibration_set  # noqa: E402
from llmprune.compression import compress_model
from llmprune.perplexity import perplexity  # noqa: E402
from llmprune.recipe import Recipe  # noqa: E402

MODULES = ["argparse", "asyncio", "calendar", "collections", "csv", "datetime", "decimal", "difflib", "email",
           "fractions", "functools", "heapq", "http.client", "inspect", "ipaddress", "itertools", "json", "logging",
           "mailbox", "os", "pathlib", "pickle", "random", "re", "shutil", "smtplib", "socket", "sqlite3",
           "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "turtle", "typing",
           "unittest", "urllib.request", "uuid", "zipfile"]


def docstrings_text() -> str:
    """The module, class and function docstrings of MODULES, in a fixed order."""
    parts = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.7,0.6")
    ap.add_argument("--allocations", default="uniform,owl,owl-auto,spdy")
    ap.add_argument("--nsamples", type=int, default=Recipe.nsamples)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-count", type=int, default=16)
    ap.add_argument("--spdy-steps", type=int, default=24)
    ap.add_argument("--spdy-samples", type=int, default=Recipe.spdy_samples)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_allocation.txt"))
    args = ap.parse_args()
    model, tokenizer, pristine, base, shakespeare, held_out = setup(args.nsamples, args.seqlen, args.eval_count)
    docs = Path(tempfile.mkdtemp()) / "stdlib_docstrings.txt"
    docs.write_text(docstrings_text())
    other, info = calibration_set(tokenizer, model, base.replace(calib=str(docs)).resolve().calibration)
    settings = {"shakespeare train": shakespeare, f"stdlib docstrings ({info['tokens']} tokens drawn)": other}
    lines = [f"# bench_allocation: SmolLM2-135M, sparsegpt, calibration {args.nsamples} x {args.seqlen},"
             f" held-out built-in text {args.eval_count} x {args.seqlen}; spdy {args.spdy_steps} steps scored on"
             f" {args.spdy_samples} windows; CPU, one process",
             f"{'calibrated on':42} {'sparsity':>8} {'allocation':>10} {'ppl':>9} {'/uniform':>9} {'wall s':>8}"
             f" {'/uniform':>9}"]
    print("\n".join(lines), flush=True)
    for setting, windows in settings.items():
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            uniform = {}
            for allocation in args.allocations.split(","):
                model.load_state_dict(pristine)
                auto = allocation == "owl-auto"  # --allocation owl --owl-lambda auto
                recipe = base.replace(sparsity=sparsity, allocation="owl" if auto else allocation,
                                      owl_lambda="auto" if auto else base.owl_lambda, spdy_steps=args.spdy_steps,
                                      spdy_samples=args.spdy_samples)
                t0 = time.perf_counter()
                compress_model(model, tokenizer, recipe.resolve(), windows=windows, progress=False)
                wall = time.perf_counter() - t0
                ppl = perplexity(model, held_out, CPU, progress=False)
                if allocation == "uniform":
                    uniform = {"ppl": ppl, "wall": wall}
                row = (f"{setting:42} {sparsity:>8.2f} {allocation:>10} {ppl:>9.2f}"
                       f" {ppl / uniform['ppl'] if uniform else float('nan'):>9.3f} {wall:>8.1f}"
                       f" {wall / uniform['wall'] if uniform else float('nan'):>9.2f}")
                print(row, flush=True)
                lines.append(row)
    publish(lines, args.out, echo=False)


if __name__ == "__main__":
    main()
