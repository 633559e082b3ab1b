"""Triton kernels, installed as ``llmprune.kernels``; each kernel sits beside its torch twin.

Triton is optional: CUDA builds of torch bring it, and on CPU its interpreter (``TRITON_INTERPRET=1``, set
before the first import) runs the same kernels on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None
    tl = None

MODES = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def use_triton(mode: str, device: torch.device | str) -> bool:
    """Whether to run the Triton kernel: ``auto`` on CUDA when triton imports; ``triton`` forces it
    (on CPU only under the interpreter); ``torch`` never."""
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    on_cuda = torch.device(device).type == "cuda"
    if mode == "torch":
        return False
    if mode == "auto":
        return triton is not None and on_cuda
    if triton is None:
        raise RuntimeError("--kernels triton needs the triton package: pip install triton")
    if not on_cuda and not interpreting():
        raise RuntimeError("--kernels triton on CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return True
