"""Dense bit packing of small unsigned integer codes into int32 words, along the last dimension.

Code ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of the row's little-endian bitstream (it may
straddle two words); a row of ``n`` codes takes ``ceil(n*bits/32)`` words. This is the layout of
compressed-tensors' ``pack-quantized`` format, where the codes are offset-binary (signed value + 2**(bits-1)).

Example, bits=4, codes [1, 2, 3] -> one word 0x321 = 801.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ROWS_PER_CHUNK = 4096  # bounds the int64 temporaries to 8 bytes x 4096 x cols


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """(rows, n) codes in [0, 2**bits) -> (rows, ceil(n*bits/32)) int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, n = codes.shape
    words = math.ceil(n * bits / 32)
    pos = torch.arange(n, device=codes.device) * bits
    word, offset = pos // 32, pos % 32
    out = torch.empty(rows, words, dtype=torch.int32, device=codes.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        v = codes[r0 : r0 + _ROWS_PER_CHUNK].to(torch.int64)
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
            raise ValueError(f"codes outside [0, {2**bits}) cannot be packed in {bits} bits")
        shifted = v << offset  # < 2**40: the low 32 bits go to `word`, the rest spills into `word + 1`
        acc = torch.zeros(v.shape[0], words + 1, dtype=torch.int64, device=codes.device)
        acc.index_add_(1, word, shifted & 0xFFFFFFFF)  # bit ranges never overlap, so adding is OR
        acc.index_add_(1, word + 1, shifted >> 32)
        acc = acc[:, :words]
        out[r0 : r0 + _ROWS_PER_CHUNK] = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
    return out


def unpack_int32(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_int32``: (rows, words) int32 -> (rows, n) uint8 codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, words = packed.shape
    if words != math.ceil(n * bits / 32):
        raise ValueError(f"{words} words per row cannot hold exactly {n} codes of {bits} bits")
    pos = torch.arange(n, device=packed.device) * bits
    word, offset = pos // 32, pos % 32
    out = torch.empty(rows, n, dtype=torch.uint8, device=packed.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        p = packed[r0 : r0 + _ROWS_PER_CHUNK].to(torch.int64) & 0xFFFFFFFF
        p = torch.cat([p, torch.zeros_like(p[:, :1])], dim=1)  # a zero word after the last, for spills
        both = p[:, word] | (p[:, word + 1] << 32)
        out[r0 : r0 + _ROWS_PER_CHUNK] = ((both >> offset) & (2**bits - 1)).to(torch.uint8)
    return out
