"""Ahead-of-time compilation of every Triton kernel specialisation for real GPUs, with no GPU present.

The tests run the kernels under ``TRITON_INTERPRET=1``, which executes them in Python and so forgives what a
GPU compile refuses (a kernel reading a plain Python global, say). ``triton.compile`` with a ``GPUTarget``
runs the real pipeline (TTIR → TTGIR → LLVM → PTX → ptxas → cubin) on the CPU: this module does that for the
specialisations each kernel module lists in ``aot_variants()`` and reads the cubin's register, stack and
shared-memory use. ``scripts/kernels_aot.py`` prints the table; ``tests/test_kernels_aot.py`` fails on a
kernel that does not compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmprune.kernels import Variant, triton

# sm_80 (A100), sm_90 (H100/H200); sm_100 (B200) where the installed Triton targets it
ARCHS = (80, 90, 100)


@dataclass(frozen=True)
class Compiled:
    label: str
    arch: int
    registers: int | None  # per thread, from the cubin (None: cuobjdump not available)
    stack_bytes: int | None  # per-thread stack frame: register spills and local arrays
    shared_bytes: int  # shared memory a program needs (Triton's metadata)
    num_warps: int
    seconds: float


def variants() -> list[Variant]:
    """Every specialisation the code launches, from each kernel module."""
    from llmprune.kernels import obs_update, pack24

    return obs_update.aot_variants() + pack24.aot_variants()


def supported_archs() -> list[int]:
    """The archs of ``ARCHS`` the installed Triton can compile for (sm_100 needs its Blackwell ptxas)."""
    if triton is None:
        return []
    return [arch for arch in ARCHS if arch < 100 or (_bin() / "ptxas-blackwell").exists()]


def _bin() -> Path:
    """The CUDA tools Triton's wheel ships (ptxas, cuobjdump)."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of the one function in ``cubin``, by cuobjdump (shipped with Triton)."""
    tool = _bin() / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=False).stdout
    finally:
        os.unlink(f.name)
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


def compile_one(v: Variant, arch: int) -> Compiled:
    """Compile one specialisation for ``sm_<arch>``; Triton's own error (with the kernel's source line) if it
    does not compile. Needs ``TRITON_INTERPRET`` unset when the kernel was defined (the interpreter replaces
    the JIT function by a Python one)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    names = v.kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in v.aligned}
    src = ASTSource(v.kernel, v.signature, v.constexprs, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    regs, stack = _resources(k.asm["cubin"])
    return Compiled(v.label, arch, regs, stack, int(k.metadata.shared), int(k.metadata.num_warps),
                    time.perf_counter() - t0)


def compile_all(archs: list[int] | None = None, which: list[Variant] | None = None) -> list[Compiled]:
    """Every variant (or those in ``which``) for every arch; raises on the first that fails, naming it and
    the arch."""
    out = []
    for arch in archs if archs is not None else supported_archs():
        for v in which if which is not None else variants():
            try:
                out.append(compile_one(v, arch))
            except Exception as exc:
                raise RuntimeError(f"{v.label} does not compile for sm_{arch}: {type(exc).__name__}: {exc}") from exc
    return out
