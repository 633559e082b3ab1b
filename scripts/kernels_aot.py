"""Compile every Triton kernel specialisation for sm_80/sm_90 (and sm_100 where Triton targets it) ahead of
time, on the CPU, and print registers, stack (spills) and shared memory per thread/program.

    python scripts/kernels_aot.py [--out scripts/results/kernels_aot.txt]

Exits 1 naming the first specialisation that does not compile. No GPU needed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before triton imports: the interpreter replaces the JIT functions
_CACHE = tempfile.TemporaryDirectory(prefix="llmprune-aot-")  # compile for real (no cached kernels), leave nothing
os.environ.setdefault("TRITON_CACHE_DIR", _CACHE.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    import triton

    from llmprune.kernels import aot

    try:
        rows = aot.compile_all()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = [f"Triton {triton.__version__}: {len(rows)} compiles, archs {aot.supported_archs()}", "",
             "| kernel | arch | warps | registers | stack bytes | shared bytes | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.label} | sm_{r.arch} | {r.num_warps} | {r.registers} | {r.stack_bytes} | {r.shared_bytes}"
              f" | {r.seconds:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
