"""Weight quantization grids: integer (uniform) and float (FP8 E4M3, NVFP4, MXFP4), their scales, quantize and
dequantize.

A weight row (or a group of ``group_size`` consecutive input columns of it, or with ``group_size 0`` the whole
tensor) shares one ``scale``; each weight is stored as a code and its value is ``(c - zero) * scale``:

- ``int``: codes ``c`` in ``[0, maxq]`` (``maxq = 2**wbits - 1``) with an integer ``zero``, so the grid
  always contains 0 exactly: pruned weights stay exactly zero. Symmetric grids fix ``zero = 2**(wbits-1)``
  (offset binary), which is also how compressed-tensors stores signed ints.
- ``fp8``: ``c`` is an FP8 E4M3 value (±448 at most, 3 mantissa bits), ``zero = 0``; scale = amax / 448 in the
  weights' dtype, per channel, per group or per tensor.
- ``nvfp4``: ``c`` is an E2M1 value (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}); one FP8 E4M3 scale per 16 weights and one
  FP32 global scale per tensor, compressed-tensors' convention: ``global = 448 * 6 / amax(W)`` and the
  effective scale ``fp8_scale / global`` (``QuantParams.scale`` holds the effective one, in fp32).
- ``mxfp4``: E2M1 values with a power-of-two (E8M0) scale per 32 weights, ``2**(e - 2)`` for a group maximum
  of ``m * 2**e`` (``m`` from 1.75 up counts as ``2**(e + 1)``), as compressed-tensors and vLLM's reference.

Float grids round to the nearest value, ties to the even code, as compressed-tensors does; 0 is on every grid.

Example, 2 bits asymmetric, row [-1, 0, 0.5, 2]: scale = 3/3 = 1, zero = 1, codes [0, 1, 2, 3]
(0.5 rounds half to even, to 0 -> code 1), values [-1, 0, 0, 2].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SEARCHES = ("minmax", "mse")
GRIDS = ("int", "fp8", "nvfp4", "mxfp4")
GRID_BITS = {"fp8": 8, "nvfp4": 4, "mxfp4": 4}  # the float grids' element widths
GRID_GROUP = {"nvfp4": 16, "mxfp4": 32}  # the group sizes their formats fix
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes of the 4-bit float, by code


@dataclass(frozen=True)
class QuantSpec:
    wbits: int  # 2..8 (int); 8 (fp8); 4 (nvfp4, mxfp4)
    group_size: int = -1  # input columns sharing one scale; -1 = one per output channel (row); 0 = one per tensor
    sym: bool = True  # symmetric grid around 0 (no zero point stored) or asymmetric min..max (int only)
    search: str = "minmax"  # minmax: the full range; mse: shrink the range to minimise the rounding error
    grid: str = "int"  # int, fp8, nvfp4, mxfp4

    @property
    def is_float(self) -> bool:
        return self.grid != "int"

    @property
    def maxq(self) -> int:
        """The largest integer code (int grids)."""
        return 2**self.wbits - 1

    @property
    def qmax(self) -> float:
        """The largest magnitude of a code value around zero (float grids)."""
        return FP8_MAX if self.grid == "fp8" else FP4_MAX

    def groups(self, cols: int) -> int:
        return 1 if self.group_size <= 0 else cols // self.group_size

    def group_cols(self, cols: int) -> int:
        return cols if self.group_size <= 0 else self.group_size

    def scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype scales are held in for weights of ``dtype``: the weights' own (int, fp8: what the checkpoint
        stores), fp32 for the FP4 grids (their effective scales, fp8 / global or powers of two, are exact there)."""
        return torch.float32 if self.grid in ("nvfp4", "mxfp4") else dtype

    @property
    def grouping(self) -> str:
        """What shares a scale: 'channel', 'tensor' or 'g128'."""
        return {-1: "channel", 0: "tensor"}.get(self.group_size, f"g{self.group_size}")

    @property
    def label(self) -> str:
        """e.g. '4-bit g128', '4-bit channel asym', 'fp8 channel', 'nvfp4'."""
        g = self.grouping
        if self.grid in GRID_GROUP:
            return self.grid
        if self.grid == "fp8":
            return f"fp8 {g}"
        return f"{self.wbits}-bit {g}{'' if self.sym else ' asym'}"


@dataclass
class QuantParams:
    """Per (row, group) grid of one layer, in original column order (groups contiguous on disk)."""

    scale: Tensor  # (rows, groups), in spec.scale_dtype(weights' dtype): the scale a code value is multiplied by
    zero: Tensor  # (rows, groups), uint8 codes in [0, maxq]; 0 for float grids
    spec: QuantSpec
    global_scale: Tensor | None = None  # nvfp4: the tensor's FP32 global scale, shape (1,)

    def columns(self, cols: int) -> tuple[Tensor, Tensor]:
        """scale and zero as float32, expanded to (rows, cols)."""
        g = self.spec.group_cols(cols)
        return self.scale.float().repeat_interleave(g, dim=1), self.zero.float().repeat_interleave(g, dim=1)

    def to(self, device: torch.device | str) -> QuantParams:
        gs = self.global_scale.to(device) if self.global_scale is not None else None
        return QuantParams(self.scale.to(device), self.zero.to(device), self.spec, gs)


def sym_zero(scale: Tensor, spec: QuantSpec) -> Tensor:
    """The zero points of a symmetric grid (not stored in checkpoints): the middle code (0 on a float grid)."""
    return torch.full_like(scale, 0 if spec.is_float else (spec.maxq + 1) // 2, dtype=torch.uint8)


def round_e2m1(x: Tensor) -> Tensor:
    """The nearest E2M1 value of each entry (clamped to ±6; ties to the even code; +0 for zeros)."""
    a = x.abs().clamp(max=FP4_MAX)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), 2 * torch.round(a / 2)))
    return q.copysign(x) + 0.0  # -0 + 0 = +0


def round_e4m3(x: Tensor) -> Tensor:
    """The nearest FP8 E4M3 value of each entry (clamped to ±448: the cast alone would make NaNs; +0 for zeros)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() + 0.0


def round_codes(x: Tensor, spec: QuantSpec) -> Tensor:
    """``x`` (weights / scale, float32) to the grid's code values around zero: integers on an int grid (not
    clamped: the caller clamps to its zero point's range), E4M3 or E2M1 values on a float grid."""
    if spec.grid == "int":
        return torch.round(x)
    return round_e4m3(x) if spec.grid == "fp8" else round_e2m1(x)


def quantize(x: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Codes (as floats) of ``x`` on the grid: clamp(round(x / scale) + zero, 0, maxq) on an int grid, the
    nearest float code value of x / scale on a float grid."""
    if spec.is_float:
        return round_codes(x / scale, spec)
    return torch.clamp(torch.round(x / scale) + zero, 0, spec.maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (codes - zero) * scale


def fake_quant(x: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """The nearest grid value of each entry (round to nearest, clamped to the grid)."""
    return dequantize(quantize(x, scale, zero, spec), scale, zero)


def global_scale(W: Tensor, spec: QuantSpec) -> Tensor | None:
    """nvfp4's FP32 global scale of a tensor, 448 * 6 / amax (1 for an all-zero one), as compressed-tensors'
    ``generate_gparam``; None for the other grids."""
    if spec.grid != "nvfp4":
        return None
    amax = W.detach().abs().max().float().clamp(min=torch.finfo(torch.float32).tiny)
    gs = torch.nan_to_num(FP8_MAX * FP4_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)
    return gs.reshape(1).to(W.device)


def stored_scale(scale: Tensor, params: QuantParams) -> Tensor:
    """``scale`` (fp32, shaped like ``params.scale``) rounded to a value the checkpoint can store for this grid:
    the scale dtype (int, fp8), an E4M3 value over the global scale (nvfp4), a power of two (mxfp4)."""
    spec = params.spec
    if spec.grid == "mxfp4":
        return torch.exp2(torch.round(torch.log2(scale.clamp(min=2.0**-127))).clamp(-127, 127))
    if spec.grid == "nvfp4":
        gs = params.global_scale.float().to(scale.device)
        local = (scale * gs).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
        return torch.where(local > 0, local, torch.full_like(local, 2.0**-9)) / gs
    return scale.to(params.scale.dtype).float()


def _mx_scale(amax: Tensor) -> Tensor:
    """MXFP4's power-of-two scale of groups with maxima ``amax``: 2**(e - 2) for amax = m * 2**e, m in [1, 2),
    e + 1 when m >= 1.75 (compressed-tensors' round_to_power_2 with E2M1's one mantissa bit), within E8M0."""
    m, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
    e = (e - 1 + (m >= 0.875).int()).float()
    e = torch.where(amax > 0, e - 2, torch.full_like(e, -127.0))
    return torch.exp2(e.clamp(-127, 127))


def _grid(xmin: Tensor, xmax: Tensor, spec: QuantSpec, scale_dtype: torch.dtype,
          gscale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """scale and zero for ranges [xmin, xmax] (each containing 0), scale rounded to what the checkpoint stores."""
    if spec.is_float:
        amax = torch.maximum(-xmin, xmax)
        if spec.grid == "mxfp4":
            return _mx_scale(amax), torch.zeros_like(amax)
        if spec.grid == "nvfp4":  # fp8(gs * amax / 6), then / gs
            if gscale is None:
                raise ValueError("nvfp4 grids need the tensor's global scale")
            gs = gscale.float()
            local = (gs * amax / FP4_MAX).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
            local = torch.where(local > 0, local, torch.full_like(local, 2.0**-9))  # the smallest E4M3 step
            return local / gs, torch.zeros_like(amax)
        scale = amax / FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).float()
        tiny = torch.finfo(scale_dtype).tiny
        return torch.where(scale > 0, scale, torch.full_like(scale, tiny)), torch.zeros_like(amax)
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
    x: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32, grid: int = 100, max_shrink: float = 0.8,
    gscale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One (scale, zero) per row of ``x`` (rows, n): its min..max range (always including 0), or with
    ``search="mse"`` the range shrunk by the factor p in {1, 0.99, ..., 1 - max_shrink} whose grid rounds
    the row with the least squared error (GPTQ's search, which trades clipping a few outliers for finer steps).
    ``gscale``: nvfp4's global scale of the tensor the rows come from.
    """
    x = x.float()
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    scale, zero = _grid(xmin, xmax, spec, scale_dtype, gscale)
    if spec.search == "minmax":
        return scale, zero
    best = (fake_quant(x, scale[:, None], zero[:, None], spec) - x).pow_(2).sum(dim=1)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = _grid(p * xmin, p * xmax, spec, scale_dtype, gscale)
        err = (fake_quant(x, s[:, None], z[:, None], spec) - x).pow_(2).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def layer_params(W: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32,
                 gscale: Tensor | None = None) -> QuantParams:
    """Grids for every (row, group) of ``W`` from its values as they are (round-to-nearest's grids); one per
    tensor (``group_size`` 0) is held as the same scale on every row. ``scale_dtype``: of the weights (the
    scales are held in ``spec.scale_dtype`` of it); nvfp4's global scale is W's unless ``gscale`` is given."""
    rows, cols = W.shape
    dtype = spec.scale_dtype(scale_dtype)
    if gscale is None:
        gscale = global_scale(W, spec)
    if spec.group_size == 0:
        scale, zero = find_params(W.reshape(1, -1), spec, dtype, gscale=gscale)
        scale, zero = scale.expand(rows).reshape(rows, 1), zero.expand(rows).reshape(rows, 1)
    else:
        g = spec.group_cols(cols)
        groups = W.float().reshape(rows, cols // g, g).transpose(0, 1).reshape(-1, g)  # (groups*rows, g)
        scale, zero = find_params(groups, spec, dtype, gscale=gscale)
        scale, zero = scale.reshape(-1, rows).t(), zero.reshape(-1, rows).t()  # (rows, groups)
    return QuantParams(scale.to(dtype).contiguous(), zero.to(torch.uint8).contiguous(), spec, gscale)


def rtn(W: Tensor, spec: QuantSpec, params: QuantParams | None = None) -> tuple[Tensor, QuantParams]:
    """Round to nearest on each group's grid (the baseline GPTQ must beat). Zeros stay zeros."""
    params = params or layer_params(W, spec, W.dtype)
    scale, zero = params.columns(W.shape[1])
    return fake_quant(W.float(), scale, zero, spec).to(W.dtype), params


def codes(W: Tensor, params: QuantParams) -> Tensor:
    """The codes of weights that lie on their grid (as the solvers leave them), recovered exactly: uint8 on an
    int grid, the float code values (float32) on a float grid.

    Rounding W / scale recovers c unless W's dtype moved the value by more than half a step: bf16 keeps 8
    significant bits, so with |c - zero| > 128 (asymmetric 8-bit) a grid value can round past the midpoint
    (4.0149 -> 4.0 with steps of 0.0281). There the neighbouring code whose value, in W's dtype, is W is taken.
    (Float codes have at most 4 significant bits, so W's rounding never moves them that far.)
    """
    scale, zero = params.columns(W.shape[1])
    spec = params.spec
    c = quantize(W.float(), scale, zero, spec)
    if spec.is_float:
        return c
    if W.dtype in (torch.float16, torch.bfloat16):
        ok = dequantize(c, scale, zero).to(W.dtype) == W
        for step in (-1.0, 1.0):
            alt = torch.clamp(c + step, 0, spec.maxq)
            fits = ~ok & (dequantize(alt, scale, zero).to(W.dtype) == W)
            c = torch.where(fits, alt, c)
            ok = ok | fits
    return c.to(torch.uint8)


def on_grid(W: Tensor, params: QuantParams) -> bool:
    """True when every weight equals the dequantized value of its code in W's own dtype."""
    scale, zero = params.columns(W.shape[1])
    return bool(torch.equal(dequantize(codes(W, params).float(), scale, zero).to(W.dtype), W))


def stored_bits(params: QuantParams, shape: tuple[int, int], scale_bytes: int) -> float:
    """Bits per weight on disk: the codes, plus each group's scale (nvfp4: FP8, mxfp4: E8M0, fp8 and int: in the
    weights' dtype, ``scale_bytes``; one per tensor for group size 0), (asymmetric) its packed zero point, and
    nvfp4's FP32 global scale."""
    rows, cols = shape
    spec = params.spec
    bits = {"nvfp4": 8, "mxfp4": 8}.get(spec.grid, 8 * scale_bytes) + (0 if spec.sym else spec.wbits)
    scales = 1 if spec.group_size == 0 else spec.groups(cols) * rows
    extra = scales * bits + (32 if spec.grid == "nvfp4" else 0)
    return spec.wbits + extra / (rows * cols)


def fake_quant_activations(x: Tensor, act) -> Tensor:
    """Inputs of a linear as a runtime quantizes them under a scheme's dynamic ``act`` (schemes.ActSpec), in
    compressed-tensors' arithmetic and x's dtype: per token, scale = amax / (range / 2) (448 for FP8, 127.5
    for int8), x / scale rounded (int: clamped to [-2**(b-1), 2**(b-1) - 1]; FP8: the nearest E4M3 value), times
    the scale; per group of 32 (MXFP4), the power-of-two scale and E2M1 rounding of the weights' grid."""
    if act.strategy == "group":
        shape = x.shape
        g = x.float().unflatten(-1, (-1, act.group_size))
        scale = _mx_scale(g.abs().amax(-1, keepdim=True))
        return (round_e2m1(g / scale) * scale).reshape(shape).to(x.dtype)
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
    amax = torch.maximum(lo.abs(), hi.abs())
    if act.type == "float":
        qmin, qmax = -FP8_MAX, FP8_MAX
    else:
        qmin, qmax = -(2.0 ** (act.bits - 1)), 2.0 ** (act.bits - 1) - 1
    half = torch.tensor(qmax - qmin, dtype=x.dtype, device=x.device) / 2
    scale = amax / half
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype, device=x.device), scale)
    q = torch.clamp(x / scale, qmin, qmax)
    q = q.to(torch.float8_e4m3fn) if act.type == "float" else torch.round(q)
    return q.to(scale.dtype) * scale


def quantize_inputs(model: torch.nn.Module, names, act) -> list:
    """Fake-quantize the inputs of the linears ``names`` of ``model`` as ``act`` declares (forward pre-hooks,
    returned so they can be removed): the perplexity then is the one a runtime quantizing activations sees."""
    hooks = []
    for name in names:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_pre_hook(lambda m, args: (fake_quant_activations(args[0], act),
                                                                     *args[1:])))
    return hooks
