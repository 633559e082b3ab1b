"""Every Triton kernel specialisation compiles for real GPUs (sm_80, sm_90, and sm_100 where Triton targets
it), ahead of time on this CPU: the interpreter the other kernel tests use forgives what a GPU compile
refuses. Run in a subprocess, as the interpreter must be off when the kernels are defined."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError:  # pragma: no cover - older Triton
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 4):
    pytest.skip(f"Triton {triton.__version__}: the AOT signature format is Triton >= 3.4's",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], tmp_path, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, leave nothing behind
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "table.txt"
    proc = _run(["scripts/kernels_aot.py", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    for arch in ("sm_80", "sm_90"):
        for kernel in ("obs_update[mask, quant, BB=128]", "obs_update[2:4, quant, BB=128]", "pack24[bf16]",
                       "unpack24[fp16]"):
            assert f"| {kernel} | {arch} |" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| obs_update[")]
    # the default block (128 columns) keeps its tiles in registers: no stack frame (spills) on sm_80/sm_90
    assert all(r[4] == "0" for r in rows if "BB=128" in r[0] and r[1] in ("sm_80", "sm_90")), table


def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    """The check is real: a kernel reading a plain Python global (the bug the interpreter hid) is caught."""
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        SCALE = 3.0  # a plain float, not tl.constexpr

        @triton.jit
        def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + i, mask=i < n)
            tl.store(x_ptr + i, x * SCALE, mask=i < n)
    '''))
    (tmp_path / "check.py").write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import broken_kernel
        from llmprune.kernels import Variant, aot

        variant = Variant("scale_kernel", broken_kernel.scale_kernel, {{"x_ptr": "*fp32", "n": "i32",
                          "BLOCK": "constexpr"}}, {{"BLOCK": 64}})
        try:
            aot.compile_all([90], [variant])
        except RuntimeError as exc:
            print("FAILED:", exc)
            sys.exit(0)
        print("compiled")
        sys.exit(1)
    '''))
    proc = _run([str(tmp_path / "check.py")], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "scale_kernel does not compile for sm_90" in proc.stdout and "SCALE" in proc.stdout
