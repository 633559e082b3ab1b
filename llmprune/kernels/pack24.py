"""2:4 packing: a matrix with at most 2 nonzeros in every 4 consecutive entries of a row, stored as its kept
values ``[rows, cols/2]`` and 2-bit positions ``[rows, ceil(cols/8)]`` uint8, and back.

Layout: group ``g`` (columns 4g..4g+3) keeps two positions ``lo < hi``; its nibble is ``lo | hi << 2``,
in the low half of byte ``g // 2`` for even ``g`` and the high half for odd ``g``. A group with fewer than
two nonzeros keeps its nonzeros plus the first zero positions, so the layout is unique.

Example, one row ``[0, 5, 0, 7,  3, 0, 0, 0]``: values ``[5, 7, 3, 0]``, nibbles ``1 | 3<<2 = 13`` and
``0 | 1<<2 = 4``, meta byte ``13 | 4<<4 = 77``.

``pack24``/``unpack24`` are Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``pack24_torch``/
``unpack24_torch`` are their torch twins and produce identical tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.kernels import Variant, launching_on, tl, triton

BLOCK_ROWS = 16
BLOCK_PAIRS = 32  # byte columns per program: 2 groups of 4 weights each


def check24(W: Tensor, name: str = "matrix") -> None:
    """Raise ValueError naming the first row (and column) with more than 2 nonzeros in a group of 4."""
    rows, cols = W.shape
    if cols % 4:
        raise ValueError(f"{name}: {cols} columns are not a multiple of 4, so it cannot hold 2:4")
    bad = (W.reshape(rows, cols // 4, 4) != 0).sum(-1) > 2  # (rows, groups)
    if bool(bad.any()):
        r, g = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}: row {r} breaks 2:4 (columns {4 * g}..{4 * g + 3} hold 3 or 4 nonzeros)")


def pack24_torch(W: Tensor) -> tuple[Tensor, Tensor]:
    """(values [rows, cols/2], meta [rows, ceil(cols/8)] uint8) of a 2:4 matrix."""
    check24(W)
    rows, cols = W.shape
    groups = W.reshape(rows, cols // 4, 4)
    key = (groups == 0).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8, device=W.device)
    idx = key.argsort(dim=-1)[..., :2].sort(dim=-1).values  # nonzeros first, then the first zeros; ascending
    values = groups.gather(-1, idx).reshape(rows, cols // 2)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # (rows, groups)
    if nib.shape[1] % 2:
        nib = torch.cat([nib, torch.zeros_like(nib[:, :1])], dim=1)
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def unpack24_torch(values: Tensor, meta: Tensor, cols: int) -> Tensor:
    """The dense (rows, cols) matrix back from ``pack24_torch``'s output."""
    rows = values.shape[0]
    groups = cols // 4
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(rows, -1)[:, :groups].long()
    idx = torch.stack([nib & 3, nib >> 2], dim=-1)  # (rows, groups, 2)
    out = torch.zeros(rows, groups, 4, dtype=values.dtype, device=values.device)
    out.scatter_(-1, idx, values.reshape(rows, groups, 2))
    return out.reshape(rows, cols)


if triton is not None:

    @triton.jit
    def _select(x0, x1, x2, x3):
        """Kept values (lo, hi) of one group of 4 and its nibble; rank = nonzeros first, then position."""
        # compared in fp32: -0.0 is a zero (the interpreter compares 16-bit floats bitwise)
        n0 = (x0.to(tl.float32) != 0).to(tl.int32)
        n1 = (x1.to(tl.float32) != 0).to(tl.int32)
        n2 = (x2.to(tl.float32) != 0).to(tl.int32)
        n3 = (x3.to(tl.float32) != 0).to(tl.int32)
        nnz = n0 + n1 + n2 + n3
        k0 = tl.where(n0 == 1, 0, nnz) < 2
        k1 = tl.where(n1 == 1, n0, nnz + 1 - n0) < 2
        k2 = tl.where(n2 == 1, n0 + n1, nnz + 2 - n0 - n1) < 2
        k3 = tl.where(n3 == 1, n0 + n1 + n2, nnz + 3 - n0 - n1 - n2) < 2
        lo_idx = tl.where(k0, 0, tl.where(k1, 1, 2))  # exactly two of k0..k3 hold: the first and the last
        hi_idx = tl.where(k3, 3, tl.where(k2, 2, 1))
        lo = tl.where(lo_idx == 0, x0, tl.where(lo_idx == 1, x1, x2))
        hi = tl.where(hi_idx == 3, x3, tl.where(hi_idx == 2, x2, x1))
        return lo, hi, lo_idx | (hi_idx << 2)

    @triton.jit
    def _pack24_kernel(w_ptr, v_ptr, m_ptr, rows, groups, pairs, BR: tl.constexpr, BP: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
        p = tl.program_id(1) * BP + tl.arange(0, BP)[None, :]
        row_ok = r < rows
        cols = groups * 4
        nib = tl.zeros((BR, BP), dtype=tl.int32)
        for half in tl.static_range(2):
            g = p * 2 + half
            ok = row_ok & (g < groups)
            base = w_ptr + r * cols + g * 4
            x0 = tl.load(base, mask=ok, other=0)
            x1 = tl.load(base + 1, mask=ok, other=0)
            x2 = tl.load(base + 2, mask=ok, other=0)
            x3 = tl.load(base + 3, mask=ok, other=0)
            lo, hi, n = _select(x0, x1, x2, x3)
            vbase = v_ptr + r * (groups * 2) + g * 2
            tl.store(vbase, lo, mask=ok)
            tl.store(vbase + 1, hi, mask=ok)
            nib = nib | (tl.where(ok, n, 0) << (4 * half))
        tl.store(m_ptr + r * pairs + p, nib.to(tl.uint8), mask=row_ok & (p < pairs))

    @triton.jit
    def _unpack24_kernel(v_ptr, m_ptr, w_ptr, rows, groups, pairs, BR: tl.constexpr, BP: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
        p = tl.program_id(1) * BP + tl.arange(0, BP)[None, :]
        row_ok = r < rows
        byte = tl.load(m_ptr + r * pairs + p, mask=row_ok & (p < pairs), other=0).to(tl.int32)
        for half in tl.static_range(2):
            g = p * 2 + half
            ok = row_ok & (g < groups)
            n = (byte >> (4 * half)) & 15
            lo_idx = n & 3
            hi_idx = n >> 2
            vbase = v_ptr + r * (groups * 2) + g * 2
            lo = tl.load(vbase, mask=ok, other=0)
            hi = tl.load(vbase + 1, mask=ok, other=0)
            zero = tl.zeros_like(lo)
            base = w_ptr + r * (groups * 4) + g * 4
            for j in tl.static_range(4):
                tl.store(base + j, tl.where(lo_idx == j, lo, tl.where(hi_idx == j, hi, zero)), mask=ok)


# the dtypes checkpoints hold: pack runs on the stored weights, unpack on the stored values
AOT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def aot_variants() -> list[Variant]:
    """Each specialisation ``pack``/``unpack`` launch, for the ahead-of-time check."""
    if triton is None:
        return []
    out = []
    consts = {"BR": BLOCK_ROWS, "BP": BLOCK_PAIRS}
    ints = {"rows": "i32", "groups": "i32", "pairs": "i32", "BR": "constexpr", "BP": "constexpr"}
    aligned = ("w_ptr", "v_ptr", "m_ptr")
    for name in AOT_DTYPES:
        out.append(Variant(f"pack24[{name}]", _pack24_kernel,
                           {"w_ptr": f"*{name}", "v_ptr": f"*{name}", "m_ptr": "*u8"} | ints, consts, {}, aligned))
        out.append(Variant(f"unpack24[{name}]", _unpack24_kernel,
                           {"v_ptr": f"*{name}", "m_ptr": "*u8", "w_ptr": f"*{name}"} | ints, consts, {}, aligned))
    return out


def _grid(rows: int, pairs: int) -> tuple[int, int]:
    return (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(pairs, BLOCK_PAIRS))


def pack24(W: Tensor) -> tuple[Tensor, Tensor]:
    """Triton twin of ``pack24_torch``."""
    check24(W)
    W = W.contiguous()
    rows, cols = W.shape
    groups = cols // 4
    pairs = (groups + 1) // 2
    values = torch.empty(rows, cols // 2, dtype=W.dtype, device=W.device)
    meta = torch.empty(rows, pairs, dtype=torch.uint8, device=W.device)
    if W.numel():
        with launching_on(W):
            _pack24_kernel[_grid(rows, pairs)](W, values, meta, rows, groups, pairs, BR=BLOCK_ROWS, BP=BLOCK_PAIRS)
    return values, meta


def unpack24(values: Tensor, meta: Tensor, cols: int) -> Tensor:
    """Triton twin of ``unpack24_torch``."""
    values, meta = values.contiguous(), meta.contiguous()
    rows = values.shape[0]
    groups = cols // 4
    pairs = meta.shape[1]
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if out.numel():
        with launching_on(out):
            _unpack24_kernel[_grid(rows, pairs)](values, meta, out, rows, groups, pairs, BR=BLOCK_ROWS,
                                                 BP=BLOCK_PAIRS)
    return out
