"""Triton kernels, installed as ``llmprune.kernels``; each kernel sits beside its torch twin.

Triton is optional: CUDA builds of torch bring it, and on CPU its interpreter (``TRITON_INTERPRET=1``, set
before the first import) runs the same kernels on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None
    tl = None

MODES = ("auto", "triton", "torch")

log = logging.getLogger("llmprune.kernels")


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel as the code launches it, for the ahead-of-time compile (``aot.py``).
    ``aligned``: the arguments the JIT sees as multiples of 16 in a typical launch (pointers from torch's
    allocator, a block width of 128), compiled so, as the JIT would specialise them."""

    label: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, object] = field(default_factory=dict)
    aligned: tuple[str, ...] = ()

# this process's record of which implementation ran, per kernel: (kernel, "triton" | "torch") -> launches, and the
# kernels that failed on the device with the error (each then runs its torch twin for the rest of the run)
_ran: Counter[tuple[str, str]] = Counter()
_failed: dict[str, str] = {}


def launching_on(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device and its stream: make that ``t``'s device (a run on
    ``cuda:1`` would otherwise hand device-1 pointers to a device-0 launch). Nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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


def reset() -> None:
    """Forget the record: a run starts with every kernel allowed again."""
    _ran.clear()
    _failed.clear()


def ran(kernel: str, impl: str, count: int = 1) -> None:
    """Count ``count`` launches of ``kernel`` done by ``impl`` ("triton" or "torch")."""
    _ran[kernel, impl] += count


def launches() -> Counter[tuple[str, str]]:
    """A copy of the record, to compare before and after a piece of work."""
    return Counter(_ran)


def summary(since: Counter[tuple[str, str]] | None = None) -> dict[str, dict[str, int]]:
    """kernel -> {implementation: launches} since the ``launches()`` snapshot ``since`` (default: the start)."""
    out: dict[str, dict[str, int]] = {}
    for (kernel, impl), n in sorted((_ran - (since or Counter())).items()):
        out.setdefault(kernel, {})[impl] = n
    return out


def failed(kernel: str) -> bool:
    """Whether ``kernel`` failed earlier in this run (so its torch twin runs instead)."""
    return kernel in _failed


def runs_triton(kernel: str, mode: str, device: torch.device | str) -> bool:
    """Whether this launch of ``kernel`` goes to Triton: as ``use_triton`` says, unless under ``auto`` the
    kernel already failed this run (forced, it is tried every time and fails loudly)."""
    return use_triton(mode, device) and (mode == "triton" or not failed(kernel))


def failures() -> dict[str, str]:
    """kernel -> the error it failed with, in this process."""
    return dict(_failed)


def fall_back(kernel: str, mode: str, device: torch.device | str, exc: BaseException) -> None:
    """A Triton compile or launch error: forced (``--kernels triton``) it propagates; under ``auto`` the kernel
    is marked failed and one warning line names it and the error (the caller then runs the torch twin)."""
    if mode == "triton" or isinstance(exc, torch.OutOfMemoryError):  # out of memory is no kernel's fault
        raise exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    why = f"{type(exc).__name__}: {first}"[:300]
    if kernel not in _failed:
        log.warning("kernel %s failed on %s (%s); its torch twin runs instead for the rest of this run"
                    " (--kernels torch skips it)", kernel, device, why)
    _failed[kernel] = why


def dispatch(kernel: str, mode: str, device: torch.device | str, fast, twin):
    """``fast()`` (the Triton launch) where ``mode`` picks Triton on ``device`` and ``kernel`` has not failed
    this run, else ``twin()`` (its torch twin); a failing launch falls back (``fall_back``) and runs ``twin()``.
    The two must give the same result and ``fast`` must not have touched its inputs when it raises."""
    if runs_triton(kernel, mode, device):
        try:
            out = fast()
        except Exception as exc:
            fall_back(kernel, mode, device, exc)
        else:
            ran(kernel, "triton")
            return out
    ran(kernel, "torch")
    return twin()
