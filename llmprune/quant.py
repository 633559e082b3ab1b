"""Uniform integer quantization of weights: grids, scales and zero points, quantize and dequantize.

A weight row (or a group of ``group_size`` consecutive input columns of it) is stored as integer codes
``c`` in ``[0, maxq]`` (``maxq = 2**wbits - 1``) with one ``scale`` and ``zero``; its value is
``(c - zero) * scale``. ``zero`` is an integer code, so the grid always contains 0 exactly: pruned weights
stay exactly zero after quantization. Symmetric grids fix ``zero = 2**(wbits-1)`` (offset binary), which
is also how compressed-tensors stores signed ints.

Example, 2 bits asymmetric, row [-1, 0, 0.5, 2]: scale = 3/3 = 1, zero = 1, codes [0, 1, 2, 3]
(0.5 rounds half to even, to 0 -> code 1), values [-1, 0, 0, 2].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SEARCHES = ("minmax", "mse")


@dataclass(frozen=True)
class QuantSpec:
    wbits: int  # 2..8
    group_size: int = -1  # input columns sharing one scale/zero; -1 = one per output channel (row)
    sym: bool = True  # symmetric grid around 0 (no zero point stored) or asymmetric min..max
    search: str = "minmax"  # minmax: the full range; mse: shrink the range to minimise the rounding error

    @property
    def maxq(self) -> int:
        return 2**self.wbits - 1

    def groups(self, cols: int) -> int:
        return 1 if self.group_size == -1 else cols // self.group_size

    def group_cols(self, cols: int) -> int:
        return cols if self.group_size == -1 else self.group_size


@dataclass
class QuantParams:
    """Per (row, group) grid of one layer, in original column order (groups contiguous on disk)."""

    scale: Tensor  # (rows, groups), in the checkpoint dtype (the grid is exactly what the checkpoint stores)
    zero: Tensor  # (rows, groups), uint8 codes in [0, maxq]
    spec: QuantSpec

    def columns(self, cols: int) -> tuple[Tensor, Tensor]:
        """scale and zero as float32, expanded to (rows, cols)."""
        g = self.spec.group_cols(cols)
        return self.scale.float().repeat_interleave(g, dim=1), self.zero.float().repeat_interleave(g, dim=1)


def sym_zero(scale: Tensor, spec: QuantSpec) -> Tensor:
    """The zero points of a symmetric grid (not stored in checkpoints): the middle code, shaped like ``scale``."""
    return torch.full_like(scale, (spec.maxq + 1) // 2, dtype=torch.uint8)


def quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (as floats) of ``x`` on the grid: clamp(round(x / scale) + zero, 0, maxq)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (codes - zero) * scale


def fake_quant(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """The nearest grid value of each entry (round to nearest, clamped to the grid)."""
    return dequantize(quantize(x, scale, zero, maxq), scale, zero)


def _grid(xmin: Tensor, xmax: Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """scale and zero for ranges [xmin, xmax] (each containing 0), scale rounded to what the checkpoint stores."""
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(-xmin, xmax)
        scale = 2 * amax / maxq  # codes -(maxq+1)/2 .. (maxq-1)/2 around zero = (maxq+1)/2
    else:
        scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale represents them
    scale = scale.to(scale_dtype).float()
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))  # underflow in a 16-bit dtype
    if spec.sym:
        zero_val = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero_val = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero_val


def find_params(
    x: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32, grid: int = 100, max_shrink: float = 0.8
) -> tuple[Tensor, Tensor]:
    """One (scale, zero) per row of ``x`` (rows, n): its min..max range (always including 0), or with
    ``search="mse"`` the range shrunk by the factor p in {1, 0.99, ..., 1 - max_shrink} whose grid rounds
    the row with the least squared error (GPTQ's search, which trades clipping a few outliers for finer steps).
    """
    x = x.float()
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    scale, zero = _grid(xmin, xmax, spec, scale_dtype)
    if spec.search == "minmax":
        return scale, zero
    best = (fake_quant(x, scale[:, None], zero[:, None], spec.maxq) - x).pow_(2).sum(dim=1)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = _grid(p * xmin, p * xmax, spec, scale_dtype)
        err = (fake_quant(x, s[:, None], z[:, None], spec.maxq) - x).pow_(2).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def layer_params(W: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32) -> QuantParams:
    """Grids for every (row, group) of ``W`` from its values as they are (round-to-nearest's grids)."""
    rows, cols = W.shape
    g = spec.group_cols(cols)
    groups = W.float().reshape(rows, cols // g, g).transpose(0, 1).reshape(-1, g)  # (groups*rows, g)
    scale, zero = find_params(groups, spec, scale_dtype)
    scale, zero = scale.reshape(-1, rows).t(), zero.reshape(-1, rows).t()  # (rows, groups)
    return QuantParams(scale.to(scale_dtype).contiguous(), zero.to(torch.uint8).contiguous(), spec)


def rtn(W: Tensor, spec: QuantSpec, params: QuantParams | None = None) -> tuple[Tensor, QuantParams]:
    """Round to nearest on each group's grid (the baseline GPTQ must beat). Zeros stay zeros."""
    params = params or layer_params(W, spec, W.dtype)
    scale, zero = params.columns(W.shape[1])
    return fake_quant(W.float(), scale, zero, spec.maxq).to(W.dtype), params


def codes(W: Tensor, params: QuantParams) -> Tensor:
    """The uint8 codes of weights that lie on their grid (as the solvers leave them), recovered exactly.

    Rounding W / scale recovers c unless W's dtype moved the value by more than half a step: bf16 keeps 8
    significant bits, so with |c - zero| > 128 (asymmetric 8-bit) a grid value can round past the midpoint
    (4.0149 -> 4.0 with steps of 0.0281). There the neighbouring code whose value, in W's dtype, is W is taken.
    """
    scale, zero = params.columns(W.shape[1])
    c = quantize(W.float(), scale, zero, params.spec.maxq)
    if W.dtype in (torch.float16, torch.bfloat16):
        ok = dequantize(c, scale, zero).to(W.dtype) == W
        for step in (-1.0, 1.0):
            alt = torch.clamp(c + step, 0, params.spec.maxq)
            fits = ~ok & (dequantize(alt, scale, zero).to(W.dtype) == W)
            c = torch.where(fits, alt, c)
            ok = ok | fits
    return c.to(torch.uint8)


def on_grid(W: Tensor, params: QuantParams) -> bool:
    """True when every weight equals the dequantized value of its code in W's own dtype."""
    scale, zero = params.columns(W.shape[1])
    return bool(torch.equal(dequantize(codes(W, params).float(), scale, zero).to(W.dtype), W))
