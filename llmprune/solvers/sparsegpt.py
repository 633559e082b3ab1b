"""SparseGPT (Frantar & Alistarh 2023), Algorithm 1: prune columns left to right, fixing the error of each
pruned weight with the inverse-Hessian row, in blocks of ``block_size`` columns with a lazy trailing update.

With a ``QuantSpec`` the same sweep also quantizes the weights it keeps (joint sparsity + quantization in
one pass); with sparsity 0 that is exactly GPTQ (Frantar et al. 2022), and ``act_order`` is GPTQ's
descending-Hessian-diagonal column order.

Names follow the paper and the reference code: W1/Q1/Err1/Hinv1 are the current block, i1:i2 its columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from llmprune.kernels import fall_back, ran, runs_triton
from llmprune.pattern import Pattern
from llmprune.quant import QuantParams, QuantSpec, find_params, layer_params
from llmprune.solvers.hinv import dead_inputs, inverse_hessian_cholesky, prepare_weight, shared_factor
from llmprune.solvers.masks import nm_mask, smallest_k_mask, split_counts
from llmprune.solvers.result import SolveResult


def check_quant_fit(cols: int, quant: QuantSpec, block_size: int) -> None:
    """Groups must tile the columns, and a group must lie inside one block or start one (so its grid is
    chosen from fully updated weights)."""
    g = quant.group_cols(cols)
    if cols % g:
        raise ValueError(f"group_size {g} does not divide the {cols} input columns")
    if quant.group_size != -1 and block_size % g and g % block_size:
        raise ValueError(f"group_size {g} and block_size {block_size}: one must be a multiple of the other")


def _nm_chunk(W1: Tensor, d1: Tensor, i: int, pattern: Pattern) -> Tensor:
    """The N:M mask of block columns i..i+M (held as rows of W1), by w²/d² of the updated weights."""
    j = i + pattern.m
    tmp = W1[i:j] ** 2 / d1[i:j].unsqueeze(1) ** 2  # (m, rows)
    return nm_mask(tmp.t(), pattern).t()


def _open_group(group: Tensor, c: int, i: int, quant: QuantSpec, dtype: torch.dtype,
                layer: tuple[Tensor, Tensor], block: tuple[Tensor, Tensor, Tensor]) -> slice:
    """A dynamic group starts at layer column ``c`` (column ``i`` of the block): choose its grid from the group's
    current (updated) weights ``group``, store it in the layer's (scaleT, zeroT) and in the block's per-column
    rows (S1, LO1, HI1). Returns the block columns the group covers."""
    g = group.shape[1]
    sc, zc = find_params(group, quant, dtype)
    scaleT, zeroT = layer
    scaleT[c // g], zeroT[c // g] = sc, zc
    S1, LO1, HI1 = block
    cover = slice(i, min(i + g, S1.shape[0]))
    S1[cover], LO1[cover], HI1[cover] = sc, -zc, quant.maxq - zc
    return cover


def _fused_block(W: Tensor, i1: int, i2: int, Hinv1: Tensor, d1: Tensor, mask1: Tensor, pattern: Pattern | None,
                 quant: QuantSpec | None, static: bool, layer: tuple[Tensor, Tensor], gidx: Tensor | None,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Columns ``i1:i2`` of the sweep in the fused Triton kernel: (final block, its mask, its errors Err1, per-row
    (total, rounding) losses), all (rows, count). Reads ``W`` and writes only the grids of the groups opening
    in the block into ``layer`` (the torch loop would write the same), so a block that fails can be redone."""
    from llmprune.kernels.obs_update import BlockState, obs_update

    count = i2 - i1
    state = BlockState(W[:, i1:i2], mask1.t() if pattern is None else None)
    nm = (pattern.n, pattern.m) if pattern is not None else None
    if quant is None:
        obs_update(state, Hinv1, d1, 0, count, nm)
    else:
        g = quant.group_cols(W.shape[1])
        Hs1 = Hinv1 / d1.unsqueeze(1)
        scaleT, zeroT = layer
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
    return state.Q.masked_fill_(mask, 0), mask, state.E, state.losses


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
    """SparseGPT's sweep over ``len(sparsities)`` stacked copies of W, one result per sparsity."""
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

    static, scaleT, zeroT, gidx = True, None, None, None
    if quant is not None:
        check_quant_fit(cols, quant, block_size)
        g = quant.group_cols(cols)
        static = quant.group_size == -1 or act_order
        if static:
            p = layer_params(W, quant, dtype)
            scaleT, zeroT = p.scale.t().float().contiguous(), p.zero.t().float().contiguous()  # (groups, rows)
        else:
            scaleT = torch.empty(cols // g, rows, device=W.device)
            zeroT = torch.empty_like(scaleT)
        gidx = torch.arange(cols, device=W.device) // g  # group of each column, in the sweep's order
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
    fused = runs_triton("obs_update", kernels, W.device)

    starts = list(range(0, cols, block_size))
    # per block, each copy's count of pruned weights
    counts = list(zip(*(split_counts([one * (min(i1 + block_size, cols) - i1) for i1 in starts], s)
                        for s in sparsities), strict=True))
    M = torch.zeros_like(W, dtype=torch.bool)
    quant_loss = torch.zeros(rows, device=W.device)  # per row: OBS losses err² of the rounding steps, of all
    total_loss = torch.zeros(rows, device=W.device)

    for i1, ks in zip(starts, counts, strict=True):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        # The block is held transposed, (count, rows), so column i is the contiguous row W1[i].
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if mask is not None:
            mask1 = mask[:, i1:i2].t().contiguous()
        elif pattern is None:
            score = W1**2 / d1.unsqueeze(1) ** 2
            mask1 = torch.cat([smallest_k_mask(score[:, c * one : (c + 1) * one], k)
                               for c, k in enumerate(ks)], dim=1) if levels > 1 else smallest_k_mask(score, ks[0])
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if fused:
            try:
                Qb, Mb, Eb, losses = _fused_block(W, i1, i2, Hinv1, d1, mask1, pattern, quant, static,
                                                  (scaleT, zeroT), gidx, dtype)
            except Exception as exc:  # compile or launch error: this block again, and the rest, in torch
                fall_back("obs_update", kernels, W.device, exc)
                fused = False
            else:
                ran("obs_update", "triton")
                total_loss += losses[:, 0]
                quant_loss += losses[:, 1]
                W[:, i1:i2] = Qb
                M[:, i1:i2] = Mb
                W[:, i2:].addmm_(Eb, Hinv[i1:i2, i2:], alpha=-1)  # in place: no (rows, cols) temporary
                continue
        ran("obs_update", "torch")
        if quant is None:
            # err = (w - q) / d with q = w masked to 0, i.e. w * mask / d: one multiply per column
            scale1 = mask1 / d1.unsqueeze(1)
            for i in range(count):
                if pattern is not None and i % pattern.m == 0:
                    mask1[i : i + pattern.m] = _nm_chunk(W1, d1, i, pattern)
                    scale1[i : i + pattern.m] = mask1[i : i + pattern.m] / d1[i : i + pattern.m].unsqueeze(1)
                torch.mul(W1[i], scale1[i], out=Err1[i])
                # rank-1 update of the rest of the block; W1[i] itself becomes 0 where pruned, w elsewhere
                W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1)
            W1.masked_fill_(mask1, 0)  # exact zeros: w - (w / d) * d may leave a rounding residue
            total_loss += Err1.square().sum(0)
        else:
            # Per column: q = clamp(round(w / s), -z, maxq - z) * s (0 where pruned), then W1[i:] -= (w - q) ⊗
            # Hinv1[i, i:] / d_i. The grids of the block's columns are laid out as rows S1/LO1/HI1 and the
            # pruned ones folded into K1 = S1 · keep, so one column is six tensor ops.
            Q1 = torch.zeros_like(W1)
            D1 = torch.zeros_like(W1)  # w - q, unscaled
            Hs1 = Hinv1 / d1.unsqueeze(1)
            cols1 = gidx[i1:i2]
            S1, Z1 = scaleT[cols1], zeroT[cols1]  # (count, rows); groups not reached yet are filled below
            LO1, HI1 = -Z1, quant.maxq - Z1
            K1 = S1 * ~mask1
            tmp = torch.empty(rows, device=W.device)
            for i in range(count):
                if pattern is not None and i % pattern.m == 0:
                    j = i + pattern.m
                    mask1[i:j] = _nm_chunk(W1, d1, i, pattern)
                    K1[i:j] = S1[i:j] * ~mask1[i:j]
                c = i1 + i
                if not static and c % g == 0:
                    # the group's columns: inside this block (updated in W1) or starting it (W is current)
                    group = W[:, c : c + g] if i == 0 else W1[i : i + g].t()
                    cover = _open_group(group, c, i, quant, dtype, (scaleT, zeroT), (S1, LO1, HI1))
                    K1[cover] = S1[cover] * ~mask1[cover]
                torch.div(W1[i], S1[i], out=tmp).round_().clamp_(min=LO1[i], max=HI1[i])
                torch.mul(tmp, K1[i], out=Q1[i])
                torch.sub(W1[i], Q1[i], out=D1[i])
                W1[i:].addr_(Hs1[i, i:], D1[i], alpha=-1)
            W1 = Q1.masked_fill_(mask1, 0)  # exact grid values (and +0, not -0, where pruned)
            torch.div(D1, d1.unsqueeze(1), out=Err1)
            losses = Err1.square()
            total_loss += losses.sum(0)
            quant_loss += losses.masked_fill_(mask1, 0).sum(0)
        W[:, i1:i2] = W1.t()
        M[:, i1:i2] = mask1.t()
        W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)

    if perm is not None:
        inv = torch.argsort(perm)
        W, M = W[:, inv], M[:, inv]
    out = []
    for c in range(levels):
        part = slice(c * one, (c + 1) * one)
        params = None
        if quant is not None:
            params = QuantParams(scaleT[:, part].t().to(dtype), zeroT[:, part].t().to(torch.uint8), quant)
        total, qloss = float(total_loss[part].sum()), float(quant_loss[part].sum())
        out.append(SolveResult(
            weight=W[part].to(dtype),
            mask=M[part],
            damp_frac=damp_used,
            retries=retries,
            quant=params,
            quant_share=qloss / total if quant is not None and total > 0 else None,
            obs_loss=total,
        ))
    return out
