"""The fused inner loop of SparseGPT/GPTQ: one block of columns, zeroed/quantized column by column with the
OBS error fed into the rest of the block, in one kernel launch instead of a few launches per column.

Each program owns ``BR`` rows of the block and keeps them on chip for the whole walk over the columns:
per column ``i`` (rows ``w``):

- prune only: ``err = w · pruned / d_i`` and ``W[:, i:] -= err ⊗ Hinv1[i, i:]``; the block's final values
  are the updated weights with the pruned ones set to 0;
- with a grid: ``q = clamp(round(w / s), lo, hi) · s · keep``, ``W[:, i:] -= (w − q) ⊗ Hinv1[i, i:] / d_i``,
  ``err = (w − q) / d_i``;
- N:M: at every M-th column, per row, the M − N lowest ``w² / d²`` of the next M updated columns are pruned.

It writes the final block ``Q1``, the errors ``Err1`` (for the trailing GEMM ``W[:, i2:] -= Err1 @
Hinv[i1:i2, i2:]``, which stays a matmul), the mask and per-row losses. The arithmetic mirrors the torch
loop in ``llmprune/solvers/sparsegpt.py`` operation for operation (IEEE divisions, round half to even), so
both give the same masks and codes, and weights equal to fp32 rounding.

A launch may cover only columns ``[c0, c1)`` of the block (it still updates the columns after ``c1``): the
solver splits a block where a quantization group starts, to choose that group's grid from the updated
weights in between, exactly as the torch loop does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.kernels import Variant, launching_on, tl, triton

BLOCK_ROWS = 16

if triton is not None:
    # 1.5 · 2**23: (x + MAGIC) − MAGIC rounds |x| < 2**22 to the nearest integer, ties to even. A kernel may read
    # a module global only as a constexpr: a plain float works under the interpreter and fails to compile.
    _MAGIC = tl.constexpr(12582912.0)

    @triton.jit
    def _column(T, cc, i):
        """Column ``i`` of the register tile ``T`` as a vector over its rows."""
        return tl.sum(tl.where(cc == i, T, tl.zeros_like(T)), axis=1)

    @triton.jit
    def _obs_update_kernel(
        W_ptr, H_ptr, D_ptr, MASK_ptr, Q_ptr, E_ptr, S_ptr, LO_ptr, HI_ptr, L_ptr,
        rows, B, c0, c1,
        NM_N: tl.constexpr, NM_M: tl.constexpr, QUANT: tl.constexpr, BR: tl.constexpr, BB: tl.constexpr,
    ):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        rr = r[:, None]
        cc = tl.arange(0, BB)[None, :]
        rok = r < rows
        ok = (rr < rows) & (cc < B)
        W = tl.load(W_ptr + rr * B + cc, mask=ok, other=0.0)
        MASK = tl.load(MASK_ptr + rr * B + cc, mask=ok, other=0).to(tl.int32)
        Q = tl.zeros((BR, BB), dtype=tl.float32)
        E = tl.zeros((BR, BB), dtype=tl.float32)
        loss = tl.zeros((BR,), dtype=tl.float32)
        qloss = tl.zeros((BR,), dtype=tl.float32)
        for i in range(c0, c1):
            if NM_M > 0:
                if i % NM_M == 0:
                    for j in tl.static_range(NM_M):
                        wj = _column(W, cc, i + j)
                        dj = tl.load(D_ptr + i + j)
                        sj = tl.math.div_rn(wj * wj, tl.zeros_like(wj) + dj * dj)
                        rank = tl.zeros((BR,), dtype=tl.int32)
                        for k in tl.static_range(NM_M):
                            wk = _column(W, cc, i + k)
                            dk = tl.load(D_ptr + i + k)
                            sk = tl.math.div_rn(wk * wk, tl.zeros_like(wk) + dk * dk)
                            if k < j:
                                rank += (sk <= sj).to(tl.int32)
                            if k > j:
                                rank += (sk < sj).to(tl.int32)
                        MASK = tl.where(cc == i + j, (rank < NM_M - NM_N).to(tl.int32)[:, None], MASK)
            w = _column(W, cc, i)
            pruned = _column(MASK, cc, i) != 0
            d = tl.load(D_ptr + i)
            dv = tl.zeros_like(w) + d
            h = tl.load(H_ptr + i * B + cc, mask=(cc >= i) & (cc < B), other=0.0)
            if QUANT:
                s = tl.load(S_ptr + i * rows + r, mask=rok, other=1.0)
                lo = tl.load(LO_ptr + i * rows + r, mask=rok, other=0.0)
                hi = tl.load(HI_ptr + i * rows + r, mask=rok, other=0.0)
                x = tl.minimum(tl.maximum(tl.math.div_rn(w, s), -4194304.0), 4194304.0)
                x = (x + _MAGIC) - _MAGIC
                x = tl.minimum(tl.maximum(x, lo), hi)
                q = x * tl.where(pruned, 0.0, s)
                diff = w - q
                W = W - diff[:, None] * h
                err = tl.math.div_rn(diff, dv)
                Q = tl.where(cc == i, q[:, None], Q)
            else:
                inv = tl.math.div_rn(tl.zeros_like(w) + 1.0, dv)
                err = w * tl.where(pruned, inv, 0.0)
                W = W - err[:, None] * h
            E = tl.where(cc == i, err[:, None], E)
            loss += err * err
            qloss += tl.where(pruned, 0.0, err * err)
        if not QUANT:
            Q = tl.where(MASK != 0, 0.0, W)
        seg = ok & (cc >= c0) & (cc < c1)
        tl.store(W_ptr + rr * B + cc, W, mask=ok)
        tl.store(Q_ptr + rr * B + cc, Q, mask=seg)
        tl.store(E_ptr + rr * B + cc, E, mask=seg)
        tl.store(MASK_ptr + rr * B + cc, MASK.to(tl.int8), mask=seg)
        old = tl.load(L_ptr + r * 2, mask=rok, other=0.0)
        tl.store(L_ptr + r * 2, old + loss, mask=rok)
        old = tl.load(L_ptr + r * 2 + 1, mask=rok, other=0.0)
        tl.store(L_ptr + r * 2 + 1, old + qloss, mask=rok)


class BlockState:
    """The buffers of one block between launches: work weights, outputs, mask, per-row losses."""

    def __init__(self, W1: Tensor, mask1: Tensor | None):
        rows, count = W1.shape
        self.W = W1.to(torch.float32, copy=True).contiguous()  # (rows, count), a copy updated in place
        self.Q = torch.zeros_like(self.W)
        self.E = torch.zeros_like(self.W)
        self.mask = (mask1.to(torch.int8) if mask1 is not None else torch.zeros(rows, count, dtype=torch.int8,
                                                                                 device=W1.device)).contiguous()
        self.losses = torch.zeros(rows, 2, device=W1.device)


def obs_update(
    state: BlockState, H1: Tensor, d1: Tensor, c0: int, c1: int, nm: tuple[int, int] | None = None,
    grid: tuple[Tensor, Tensor, Tensor] | None = None,
) -> None:
    """Walk columns ``[c0, c1)`` of the block in ``state``.

    ``H1`` (count, count): Hinv1 when pruning only, Hinv1 / diag(Hinv1)[:, None] with a grid; ``d1`` its
    diagonal; ``nm`` = (N, M) chooses the mask inside (else ``state.mask`` holds it); ``grid`` = per-column
    (scale, lo, hi), each (count, rows) float32, with lo/hi the code range around the zero point.
    """
    rows, count = state.W.shape
    if rows == 0 or c1 <= c0:
        return
    H1 = H1.float().contiguous()
    d1 = d1.float().contiguous()
    if grid is not None:
        S, LO, HI = (t.float().contiguous() for t in grid)
    else:
        S = LO = HI = d1  # unused
    n, m = nm if nm is not None else (0, 0)
    BB = triton.next_power_of_2(count)
    with launching_on(state.W):
        _obs_update_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            state.W, H1, d1, state.mask, state.Q, state.E, S, LO, HI, state.losses,
            rows, count, c0, c1,
            NM_N=n, NM_M=m, QUANT=grid is not None, BR=BLOCK_ROWS, BB=BB, **launch_options(BB),
        )


def launch_options(BB: int) -> dict:
    """Compile options of a launch over ``BB`` block columns. The four (BR, BB) fp32 tiles live in registers:
    with 4 warps a 128-column block needs 255 registers a thread and spills; one warp per 16 columns keeps it
    at ~190 on sm_80/sm_90 (``scripts/kernels_aot.py`` prints the counts). FP fusion off: no FMA contraction,
    so the kernel rounds as its torch twin does, operation for operation."""
    return {"num_warps": max(4, min(16, BB // 16)), "enable_fp_fusion": False}


# The specialisations the solver launches: every N:M the recipes offer (none, 2:4, 4:8), pruning only and with
# a grid, at the default block of 128 columns, the smaller last blocks and the larger --block-size it may see.
AOT_BLOCKS = (16, 64, 128, 256)
AOT_PATTERNS = ((0, 0), (2, 4), (4, 8))


def aot_variants() -> list[Variant]:
    """Each specialisation the solver launches, for the ahead-of-time check."""
    if triton is None:
        return []
    names = _obs_update_kernel.arg_names
    sig = {name: "*fp32" for name in names}
    sig |= {"MASK_ptr": "*i8", "rows": "i32", "B": "i32", "c0": "i32", "c1": "i32"}
    sig |= {name: "constexpr" for name in ("NM_N", "NM_M", "QUANT", "BR", "BB")}
    aligned = tuple(n for n in names if n.endswith("_ptr")) + ("B",)
    out = []
    for BB in AOT_BLOCKS:
        for n, m in AOT_PATTERNS:
            if m > BB:
                continue
            for quant in (False, True):
                label = f"obs_update[{f'{n}:{m}' if m else 'mask'}, {'quant' if quant else 'prune'}, BB={BB}]"
                consts = dict(NM_N=n, NM_M=m, QUANT=quant, BR=BLOCK_ROWS, BB=BB)
                out.append(Variant(label, _obs_update_kernel, sig, consts, launch_options(BB), aligned))
    return out


def obs_update_torch(
    state: BlockState, H1: Tensor, d1: Tensor, c0: int, c1: int, nm: tuple[int, int] | None = None,
    grid: tuple[Tensor, Tensor, Tensor] | None = None,
) -> None:
    """Torch twin of ``obs_update``, op for op (same roundings): the reference the kernel is tested against.

    The solver's own torch loop computes the same thing with fused in-place updates (``addr_``), which may
    round differently in the last bit.
    """
    W, Q, E, mask = state.W, state.Q, state.E, state.mask
    H1, d1 = H1.float(), d1.float()
    loss = torch.zeros_like(state.losses)  # summed per launch, then added (the kernel's order)
    for i in range(c0, c1):
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            d = d1[i : i + m]
            score = (W[:, i : i + m] * W[:, i : i + m]) / (d * d)
            # rank: lower scores first, ties by position (the kernel's order)
            less = score.unsqueeze(2) < score.unsqueeze(1)  # [r, j, k]: s_j < s_k
            eq_before = (score.unsqueeze(2) == score.unsqueeze(1)) & torch.ones(m, m, dtype=torch.bool,
                                                                                device=W.device).triu(1)
            rank = (less | eq_before).sum(1)  # how many come before k
            mask[:, i : i + m] = (rank < m - n).to(torch.int8)
        w = W[:, i].clone()
        pruned = mask[:, i] != 0
        d = d1[i]
        h = torch.zeros_like(H1[i])
        h[i:] = H1[i, i:]
        if grid is not None:
            s, lo, hi = (t[i].float() for t in grid)
            x = torch.clamp(torch.round(w / s), min=lo, max=hi)
            q = x * torch.where(pruned, torch.zeros_like(s), s)
            diff = w - q
            W -= diff[:, None] * h[None, :]
            err = diff / d
            Q[:, i] = q
        else:
            err = w * torch.where(pruned, 1.0 / d, torch.zeros_like(d))
            W -= err[:, None] * h[None, :]
        E[:, i] = err
        loss[:, 0] += err * err
        loss[:, 1] += torch.where(pruned, torch.zeros_like(err), err * err)
    state.losses += loss
    if grid is None:
        Q[:, c0:c1] = torch.where(mask[:, c0:c1] != 0, torch.zeros_like(W[:, c0:c1]), W[:, c0:c1])
