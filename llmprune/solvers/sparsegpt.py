"""SparseGPT (Frantar & Alistarh 2023), Algorithm 1: prune columns left to right, fixing the error of each
pruned weight with the inverse-Hessian row, in blocks of ``block_size`` columns with a lazy trailing update.

With a ``QuantSpec`` the same sweep also quantizes the weights it keeps (joint sparsity + quantization in
one pass); with sparsity 0 that is exactly GPTQ (Frantar et al. 2022), and ``act_order`` is GPTQ's
descending-Hessian-diagonal column order.

Names follow the paper and the reference code: W1/Q1/Err1/Hinv1 are the current block, i1:i2 its columns.
``_obs_block`` is Algorithm 1's column loop over one block, to be read against the paper; ``_joint_block`` is
the same loop quantizing the kept weights, ``_fused_block`` either in one Triton kernel; ``_sweep`` is the outer
loop over blocks (mask selection, the lazy batch update) that calls one of them per block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from llmprune.kernels import fall_back, ran, runs_triton
from llmprune.pattern import Pattern
from llmprune.quant import QuantParams, QuantSpec, find_params, global_scale, layer_params, round_codes
from llmprune.solvers.hinv import dead_inputs, inverse_hessian_cholesky, prepare_weight, shared_factor
from llmprune.solvers.masks import nm_mask, smallest_k_mask, split_counts
from llmprune.solvers.result import SolveResult


@dataclass(frozen=True)
class SparseGPTOptions:
    """SparseGPT's (and GPTQ's) sweep options, as ``sparsegpt`` takes them; the solvers built on the sweep
    (admm's warm start, obc's and a refit's quantization on a fixed mask) take them too."""

    block_size: int = 128  # columns solved together before the lazy trailing update
    damp_frac: float = 0.01  # damping added to the Hessian's diagonal, as a fraction of its mean
    act_order: bool = False  # GPTQ's column order by descending Hessian diagonal (quantizing, no N:M)
    kernels: str = "auto"  # the column loop: auto (the fused Triton kernel on CUDA), triton or torch

    def kwargs(self) -> dict:
        """The solver's keyword arguments."""
        return dataclasses.asdict(self)

    def sweep(self) -> SparseGPTOptions:
        """The sweep's own options (for a subclass: without the solver's further ones)."""
        return SparseGPTOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SparseGPTOptions)})


def check_quant_fit(cols: int, quant: QuantSpec, block_size: int) -> None:
    """Groups must tile the columns, and a group must lie inside one block or start one (so its grid is
    chosen from fully updated weights)."""
    g = quant.group_cols(cols)
    if cols % g:
        raise ValueError(f"group_size {g} does not divide the {cols} input columns")
    if quant.group_size > 0 and block_size % g and g % block_size:
        raise ValueError(f"group_size {g} and block_size {block_size}: one must be a multiple of the other")


def _nm_chunk(W1: Tensor, d1: Tensor, i: int, pattern: Pattern) -> Tensor:
    """The N:M mask of block columns i..i+M (held as rows of W1), by w²/d² of the updated weights."""
    j = i + pattern.m
    tmp = W1[i:j] ** 2 / d1[i:j].unsqueeze(1) ** 2  # (m, rows)
    return nm_mask(tmp.t(), pattern).t()


# A block function sweeps columns i1:i2 of the layer and returns the block's result as (rows, count) views: the
# final weights Qb, the mask Mb (True = pruned), the errors Eb for the lazy update of the columns after the block,
# and per row the OBS losses err² of all its steps and (quantizing) of its rounding steps.
Block = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]


def _obs_block(W1: Tensor, Hinv1: Tensor, d1: Tensor, mask1: Tensor, pattern: Pattern | None) -> Block:
    """The inner loop of SparseGPT's Algorithm 1 over one block, in torch. The block is held transposed,
    (count, rows), so column j is the contiguous row W1[j]; ``mask1`` is the paper's 1 − M (True = pruned),
    chosen for the whole block by the caller or, with an N:M ``pattern``, here every M columns (Bs = M).
    For each column j of the block:

    - if j mod Bs = 0: M[:, j:j+Bs] ← the mask of the updated weights' w²/[H⁻¹]_jj² (``_nm_chunk``)
    - E[:, j] ← W[:, j] / [H⁻¹]_jj · (1 − M[:, j])        (the pruning error; kept weights freeze)
    - W[:, j:i2] ← W[:, j:i2] − E[:, j] · H⁻¹[j, j:i2]       (OBS update of the rest of the block)

    and W ← W · M at the end. The caller applies the lazy batch update W[:, i2:] −= E · H⁻¹[i1:i2, i2:].
    """
    Err1 = torch.zeros_like(W1)
    # err = (w - q) / d with q = w masked to 0, i.e. w * mask / d: one multiply per column
    scale1 = mask1 / d1.unsqueeze(1)
    for j in range(W1.shape[0]):
        if pattern is not None and j % pattern.m == 0:
            mask1[j : j + pattern.m] = _nm_chunk(W1, d1, j, pattern)
            scale1[j : j + pattern.m] = mask1[j : j + pattern.m] / d1[j : j + pattern.m].unsqueeze(1)
        torch.mul(W1[j], scale1[j], out=Err1[j])
        # rank-1 update of the rest of the block; W1[j] itself becomes 0 where pruned, w elsewhere
        W1[j:].addr_(Hinv1[j, j:], Err1[j], alpha=-1)
    W1.masked_fill_(mask1, 0)  # exact zeros: w - (w / d) * d may leave a rounding residue
    return W1.t(), mask1.t(), Err1.t(), Err1.square().sum(0), None


# The layer's grids as the sweep holds them: (scaleT, zeroT) (groups, rows) in float32, and nvfp4's global scale.
Grids = tuple[Tensor, Tensor, Tensor | None]


def _open_group(group: Tensor, c: int, i: int, quant: QuantSpec, dtype: torch.dtype,
                layer: Grids, block: tuple[Tensor, Tensor, Tensor]) -> slice:
    """A dynamic group starts at layer column ``c`` (column ``i`` of the block): choose its grid from the group's
    current (updated) weights ``group``, store it in the layer's (scaleT, zeroT) and in the block's per-column
    rows (S1, LO1, HI1). Returns the block columns the group covers."""
    g = group.shape[1]
    scaleT, zeroT, gscale = layer
    sc, zc = find_params(group, quant, quant.scale_dtype(dtype), gscale=gscale)
    scaleT[c // g], zeroT[c // g] = sc, zc
    S1, LO1, HI1 = block
    cover = slice(i, min(i + g, S1.shape[0]))
    S1[cover], LO1[cover], HI1[cover] = sc, -zc, quant.maxq - zc
    return cover


def _joint_block(W: Tensor, i1: int, W1: Tensor, Hinv1: Tensor, d1: Tensor, mask1: Tensor,
                 pattern: Pattern | None, quant: QuantSpec, static: bool, layer: Grids,
                 gidx: Tensor, dtype: torch.dtype) -> Block:
    """``_obs_block`` with joint quantization (the paper's section on joint sparsification and quantization;
    with nothing pruned, GPTQ's Algorithm 1): each kept weight is rounded to its group's grid and the rounding
    error is spread like a pruning error. Per column j: q = clamp(round(w / s), -z, maxq - z) · s (0 where
    pruned; on a float grid round(·) is the nearest E4M3/E2M1 value and there is no zero point), then
    W1[j:] −= (w − q) ⊗ H⁻¹[j, j:] / d_j. A dynamic group's grid is chosen from the updated
    weights when the sweep reaches its first column (``_open_group``); static grids are in ``layer`` already.

    The grids of the block's columns are laid out as rows S1/LO1/HI1 and the pruned ones folded into
    K1 = S1 · keep, so one column is six tensor ops. ``W`` (the layer) is only read, for a group that starts
    the block; ``gidx`` maps the block's columns (in sweep order) to their groups.
    """
    count, rows = W1.shape
    g = quant.group_cols(W.shape[1])
    Q1 = torch.zeros_like(W1)
    D1 = torch.zeros_like(W1)  # w - q, unscaled
    Hs1 = Hinv1 / d1.unsqueeze(1)
    scaleT, zeroT, _ = layer
    cols1 = gidx[i1 : i1 + count]
    S1, Z1 = scaleT[cols1], zeroT[cols1]  # (count, rows); groups not reached yet are filled below
    LO1, HI1 = -Z1, quant.maxq - Z1
    K1 = S1 * ~mask1
    tmp = torch.empty(rows, device=W.device)
    for j in range(count):
        if pattern is not None and j % pattern.m == 0:
            k = j + pattern.m
            mask1[j:k] = _nm_chunk(W1, d1, j, pattern)
            K1[j:k] = S1[j:k] * ~mask1[j:k]
        c = i1 + j
        if not static and c % g == 0:
            # the group's columns: inside this block (updated in W1) or starting it (W is current)
            group = W[:, c : c + g] if j == 0 else W1[j : j + g].t()
            cover = _open_group(group, c, j, quant, dtype, layer, (S1, LO1, HI1))
            K1[cover] = S1[cover] * ~mask1[cover]
        if quant.is_float:
            tmp = round_codes(W1[j] / S1[j], quant)
        else:
            torch.div(W1[j], S1[j], out=tmp).round_().clamp_(min=LO1[j], max=HI1[j])
        torch.mul(tmp, K1[j], out=Q1[j])
        torch.sub(W1[j], Q1[j], out=D1[j])
        W1[j:].addr_(Hs1[j, j:], D1[j], alpha=-1)
    Q1.masked_fill_(mask1, 0)  # exact grid values (and +0, not -0, where pruned)
    Err1 = D1 / d1.unsqueeze(1)
    losses = Err1.square()
    total = losses.sum(0)
    return Q1.t(), mask1.t(), Err1.t(), total, losses.masked_fill_(mask1, 0).sum(0)


def _fused_block(W: Tensor, i1: int, i2: int, Hinv1: Tensor, d1: Tensor, mask1: Tensor, pattern: Pattern | None,
                 quant: QuantSpec | None, static: bool, layer: Grids, gidx: Tensor | None,
                 dtype: torch.dtype) -> Block:
    """Columns ``i1:i2`` of the sweep in the fused Triton kernel (``_obs_block``, or ``_joint_block`` with
    ``quant``, in one launch per stretch of columns that share their grids). Reads ``W`` and writes only the
    grids of the groups opening in the block into ``layer`` (the torch loop would write the same), so a block
    that fails can be redone. Integer grids only (the kernel rounds to integers)."""
    from llmprune.kernels.obs_update import BlockState, obs_update

    count = i2 - i1
    state = BlockState(W[:, i1:i2], mask1.t() if pattern is None else None)
    nm = (pattern.n, pattern.m) if pattern is not None else None
    if quant is None:
        obs_update(state, Hinv1, d1, 0, count, nm)
    else:
        g = quant.group_cols(W.shape[1])
        Hs1 = Hinv1 / d1.unsqueeze(1)
        scaleT, zeroT, _ = layer
        cols1 = gidx[i1:i2]
        S1, Z1 = scaleT[cols1], zeroT[cols1]
        LO1, HI1 = -Z1, quant.maxq - Z1
        cuts = sorted({0, count} | ({i for i in range(count) if (i1 + i) % g == 0} if not static else set()))
        for a, b in zip(cuts, cuts[1:], strict=False):
            c = i1 + a
            if not static and c % g == 0:  # as in the torch loop
                group = W[:, c : c + g] if a == 0 else state.W[:, a : a + g]
                _open_group(group, c, a, quant, dtype, layer, (S1, LO1, HI1))
            obs_update(state, Hs1, d1, a, b, nm, (S1, LO1, HI1))
    mask = state.mask.bool()
    return state.Q.masked_fill_(mask, 0), mask, state.E, state.losses[:, 0], state.losses[:, 1]


def sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    pattern: Pattern | None = None,
    quant: QuantSpec | None = None,
    *,
    block_size: int = 128,
    damp_frac: float = 0.01,
    act_order: bool = False,
    kernels: str = "auto",
    mask: Tensor | None = None,
) -> SolveResult:
    """Prune (and quantize) ``W`` (rows, cols) given the Hessian ``H`` (cols, cols) = 2/n Σ x xᵀ of its inputs.

    Unstructured: each block's mask is the lowest w²/[H⁻¹]_ii² over the whole block, with counts split so the
    layer has exactly floor(sparsity · numel) zeros. N:M: at every M-th column, per row, the M−N lowest of
    the *updated* weights in the next M columns. With H = I the update is zero and this is magnitude
    pruning within each block (and round-to-nearest when quantizing).

    Quantization grids: per channel, or with ``act_order``, from W before any update ("static" groups, kept
    in the original column order so groups stay contiguous on disk); otherwise each group's grid is chosen
    from the updated weights when the sweep reaches its first column, as GPTQ does.

    ``kernels``: the column loop of each block in one fused Triton kernel (``auto``: on CUDA) or in torch.
    ``mask`` (bool (rows, cols), True = pruned): a fixed mask, e.g. another solver's; the sweep then only
    compensates (and quantizes) around it, choosing nothing (``sparsity`` and ``pattern`` are not used).
    """
    return _sweep(W, H, [sparsity], pattern, quant, block_size=block_size, damp_frac=damp_frac,
                  act_order=act_order, kernels=kernels, mask=mask)[0]


def sparsegpt_levels(
    W: Tensor,
    H: Tensor,
    sparsities: Sequence[float],
    quant: QuantSpec | None = None,
    *,
    block_size: int = 128,
    damp_frac: float = 0.01,
    act_order: bool = False,
    kernels: str = "auto",
) -> list[SolveResult]:
    """``[sparsegpt(W, H, s, None, quant) for s in sparsities]`` (unstructured), in one sweep: the copies of W
    are stacked as rows (rows are independent in the sweep; each copy's mask is chosen over its own rows), so
    the factor, the column loop and its Python overhead are paid once. SPDY's plan solves every linear at ~9
    sparsities; on small layers this is several times faster than one call per sparsity, on large ones the
    same (the work is the same, the stacked W takes ``len(sparsities)`` times the memory).
    """
    return _sweep(W, H, list(sparsities), None, quant, block_size=block_size, damp_frac=damp_frac,
                  act_order=act_order, kernels=kernels, mask=None)


def _sweep(
    W: Tensor,
    H: Tensor,
    sparsities: list[float],
    pattern: Pattern | None,
    quant: QuantSpec | None,
    *,
    block_size: int,
    damp_frac: float,
    act_order: bool,
    kernels: str,
    mask: Tensor | None,
) -> list[SolveResult]:
    """SparseGPT's sweep over ``len(sparsities)`` stacked copies of W, one result per sparsity: Algorithm 1's
    outer loop over blocks of ``block_size`` columns (each block's mask, its column loop in one of the block
    functions above, the lazy batch update of the columns after it)."""
    dtype = W.dtype
    dead = dead_inputs(H)
    W = prepare_weight(W, dead)  # H itself is only read: the caller's copy is all there is of it
    levels = len(sparsities)
    if levels > 1:
        if pattern is not None or mask is not None:
            raise ValueError("several sparsities in one sweep are for unstructured masks chosen by the sweep")
        W = W.repeat(levels, 1)
    rows, cols = W.shape
    one = rows // levels  # the rows of one copy
    if pattern is not None and cols % pattern.m:
        raise ValueError(f"{cols} input columns cannot hold {pattern}: not a multiple of {pattern.m}")
    if act_order and (quant is None or pattern is not None):
        raise ValueError("act_order needs quantization and no N:M pattern (the pattern is in the original order)")

    static, scaleT, zeroT, gidx, gscale = True, None, None, None, None
    if quant is not None:
        gscale = global_scale(W, quant)  # nvfp4: from W as given (the stacked copies are the same W)
        static, scaleT, zeroT, gidx = _grids(W, quant, block_size, act_order, dtype, gscale)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H).masked_fill(dead, 1), descending=True, stable=True)
        W, H, gidx = W[:, perm], H[perm][:, perm], gidx[perm]
        mask = mask[:, perm] if mask is not None else None
    if mask is not None:
        pattern = None  # nothing to choose: the given mask holds whatever pattern it has

    # read only below, so linears sharing this H (q/k/v, gate/up) share the factor
    Hinv, damp_used, retries = shared_factor("sparsegpt", H, (damp_frac,),
                                             partial(inverse_hessian_cholesky, H, damp_frac))
    del H
    # the fused kernel rounds to integer grids: a float grid's sweep is the torch loop
    fused = runs_triton("obs_update", kernels, W.device) and (quant is None or not quant.is_float)

    starts = list(range(0, cols, block_size))
    # per block, each copy's count of pruned weights
    counts = list(zip(*(split_counts([one * (min(i1 + block_size, cols) - i1) for i1 in starts], s)
                        for s in sparsities), strict=True))
    M = torch.zeros_like(W, dtype=torch.bool)
    quant_loss = torch.zeros(rows, device=W.device)  # per row: OBS losses err² of the rounding steps, of all
    total_loss = torch.zeros(rows, device=W.device)

    for i1, ks in zip(starts, counts, strict=True):
        i2 = min(i1 + block_size, cols)
        # The block is held transposed, (count, rows), so column i is the contiguous row W1[i].
        W1 = W[:, i1:i2].t().contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = _block_mask(W1, d1, mask[:, i1:i2] if mask is not None else None, pattern, ks)
        block = None
        if fused:
            try:
                block = _fused_block(W, i1, i2, Hinv1, d1, mask1, pattern, quant, static, (scaleT, zeroT, gscale),
                                     gidx, dtype)
            except Exception as exc:  # compile or launch error: this block again, and the rest, in torch
                fall_back("obs_update", kernels, W.device, exc)
                fused = False
            else:
                ran("obs_update", "triton")
        if block is None:
            ran("obs_update", "torch")
            block = _obs_block(W1, Hinv1, d1, mask1, pattern) if quant is None else _joint_block(
                W, i1, W1, Hinv1, d1, mask1, pattern, quant, static, (scaleT, zeroT, gscale), gidx, dtype)
        Qb, Mb, Eb, total, rounding = block
        total_loss += total
        if rounding is not None:
            quant_loss += rounding
        W[:, i1:i2] = Qb
        M[:, i1:i2] = Mb
        W[:, i2:].addmm_(Eb, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update, in place: no (rows, cols) temporary

    if perm is not None:
        inv = torch.argsort(perm)
        W, M = W[:, inv], M[:, inv]
    return [_result(W, M, slice(c * one, (c + 1) * one), quant, (scaleT, zeroT, gscale), total_loss, quant_loss,
                    damp_used, retries, dtype) for c in range(levels)]


def _block_mask(W1: Tensor, d1: Tensor, given: Tensor | None, pattern: Pattern | None, ks: Sequence[int]) -> Tensor:
    """The block's mask (count, rows), True = pruned, before its column loop: the ``given`` one (rows, count);
    unstructured, Algorithm 1's selection with Bs = B: the ``ks[c]`` lowest w²/[H⁻¹]_cc² of each stacked copy
    ``c``; N:M: none yet (the column loop chooses it every M columns)."""
    if given is not None:
        return given.t().contiguous()
    if pattern is not None:
        return torch.zeros_like(W1, dtype=torch.bool)
    score = W1**2 / d1.unsqueeze(1) ** 2
    if len(ks) == 1:
        return smallest_k_mask(score, ks[0])
    one = W1.shape[1] // len(ks)  # the rows of one copy
    return torch.cat([smallest_k_mask(score[:, c * one : (c + 1) * one], k) for c, k in enumerate(ks)], dim=1)


def _grids(W: Tensor, quant: QuantSpec, block_size: int, act_order: bool,
           dtype: torch.dtype, gscale: Tensor | None) -> tuple[bool, Tensor, Tensor, Tensor]:
    """The sweep's quantization grids: (static, scaleT, zeroT (groups, rows), gidx: each column's group). Static
    (per channel, or with ``act_order``) grids are chosen from W now; dynamic ones are filled as the sweep
    reaches each group (in ``dtype``'s rounding, the weights' own)."""
    rows, cols = W.shape
    check_quant_fit(cols, quant, block_size)
    g = quant.group_cols(cols)
    static = quant.group_size <= 0 or act_order  # per channel or per tensor: from W as given
    if static:
        p = layer_params(W, quant, dtype, gscale)  # the caller's dtype: W is its float32 copy
        scaleT, zeroT = p.scale.t().float().contiguous(), p.zero.t().float().contiguous()  # (groups, rows)
    else:
        scaleT = torch.empty(cols // g, rows, device=W.device)
        zeroT = torch.empty_like(scaleT)
    return static, scaleT, zeroT, torch.arange(cols, device=W.device) // g  # in the sweep's order


def _result(W: Tensor, M: Tensor, part: slice, quant: QuantSpec | None, grids: Grids,
            total_loss: Tensor, quant_loss: Tensor, damp_used: float, retries: int, dtype: torch.dtype) -> SolveResult:
    """The result of the stacked copy in rows ``part``."""
    params = None
    if quant is not None:
        scaleT, zeroT, gscale = grids
        params = QuantParams(scaleT[:, part].t().to(quant.scale_dtype(dtype)), zeroT[:, part].t().to(torch.uint8),
                             quant, gscale)
    total, qloss = float(total_loss[part].sum()), float(quant_loss[part].sum())
    return SolveResult(
        weight=W[part].to(dtype),
        mask=M[part],
        damp_frac=damp_used,
        retries=retries,
        quant=params,
        quant_share=qloss / total if quant is not None and total > 0 else None,
        obs_loss=total,
    )
