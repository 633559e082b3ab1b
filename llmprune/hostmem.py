"""Host-memory policy for streaming runs: give freed memory back to the OS instead of letting RSS creep.

glibc serves an allocation below its mmap threshold from the heap, and raises that threshold (up to 32 MiB)
every time a larger mapped block is freed; after that, every Hessian, weight and activation of a block lands
in the heap, and freed heap memory mostly stays with the process. A streaming run frees a block's worth of
such tensors every block, so RSS grows well past what is live. Two remedies, both no-ops off glibc:
a fixed threshold (tensors of 4 MiB and more are mapped and unmapped on free, smaller ones keep the fast
heap) and ``malloc_trim`` between blocks.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc's malloc.h
MMAP_THRESHOLD = 4 << 20

_libc: ctypes.CDLL | None | bool = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 -- present only in glibc
            _libc.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix the mmap threshold so large tensors are returned to the OS when freed; True if it took effect."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)


def trim() -> None:
    """Hand freed heap pages back to the OS."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
