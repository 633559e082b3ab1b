"""Hessians of a block's linear layers, H = 2/n Σ x xᵀ, accumulated by forward hooks.

Linears that read the same tensor (q/k/v, gate/up) share one Hessian: the groups are found at run time by
the identity of the hook inputs, so no per-architecture name table is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulator_dtype(hessian_dtype: str) -> torch.dtype:
    """The running Hessian's dtype. ``fp64``: a product of two fp32 numbers is exact in fp64 and the sums
    carry 29 more bits than fp32, so once rounded to fp32 (``as_solver_hessian``) the Hessian seldom depends
    on how the windows were batched or split over torchrun's ranks (seldom: a sum's own rounding can still
    tip an entry near an fp32 rounding boundary). torchrun then gave the single process's weights bit for
    bit in every case tried (docs/torchrun.md); not a guarantee. Costs 2x the Hessian memory and fp64 GEMMs."""
    return torch.float64 if hessian_dtype == "fp64" else torch.float32


def as_solver_hessian(H: Tensor) -> Tensor:
    """What the solvers take: fp32 (an fp64 accumulator rounded once, after every token is in)."""
    return H if H.dtype == torch.float32 else H.float()


def on_tensor_cores(x: Tensor, hessian_dtype: str, dtype: torch.dtype) -> bool:
    """Whether xᵀx is formed from the 16-bit activations themselves, with fp32 accumulation.

    ``auto`` with fp16/bf16 activations on CUDA multiplies on the tensor cores: the product of two 16-bit
    floats is exact in fp32, so this equals the fp32 product up to summation order, at many times the fp32
    rate. ``fp32`` (and every CPU run) upcasts first.
    """
    return (hessian_dtype == "auto" and x.is_cuda and x.dtype in LOW_PRECISION and dtype == torch.float32
            and MM_OUT_DTYPE)


# torch.mm(a, b, out_dtype=...) (a 16-bit product accumulated in fp32) exists from torch 2.8; older torch, which
# pyproject allows, upcasts instead
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def strips(cols: int) -> list[tuple[int, int]]:
    """Row strips [a, e) of a (cols, cols) Hessian: each batch's xᵀx is formed strip by strip, only on and
    right of the diagonal (H[a:e, a:]), and mirrored below it, since H is symmetric. Four strips do
    10/16 of the full product's multiply-adds; narrow layers keep one GEMM."""
    nb = 4 if cols >= 512 else 2 if cols >= 256 else 1
    step = -(-cols // nb)
    return [(a, min(a + step, cols)) for a in range(0, cols, step)]


def hessian_update(H: Tensor, n: int, x: Tensor, hessian_dtype: str = "auto") -> tuple[Tensor, int]:
    """Fold a batch of inputs ``x`` (tokens, cols) into the running average H = 2/n Σ x xᵀ, in place.

    Rescaling H before adding keeps every term O(1): no overflow over many samples and no loss of the
    small late terms against a huge running sum. The batch's own xᵀx is formed unscaled (scaling a 16-bit x
    by sqrt(2/n) first would round it) and scaled in fp32; off the tensor-core path that is an in-place
    ``addmm_`` (H = βH + α xᵀx) per strip (``strips``), so no second (cols, cols) matrix is ever allocated.
    H is whole and symmetric after every call.
    """
    b = x.shape[0]
    if b == 0:
        return H, n
    beta, alpha = n / (n + b), 2 / (n + b)
    tensor_cores = on_tensor_cores(x, hessian_dtype, H.dtype)
    if not tensor_cores:
        x = x.to(H.dtype)
    parts = strips(H.shape[0])
    for a, e in parts:
        xa, xr, Hs = x[:, a:e], x[:, a:], H[a:e, a:]
        if tensor_cores:
            Hs.mul_(beta).add_(torch.mm(xa.t(), xr, out_dtype=torch.float32), alpha=alpha)
        else:  # in place, into the strip of H itself
            Hs.addmm_(xa.t(), xr, beta=beta, alpha=alpha)
    for a, e in parts[:-1]:  # the upper strips' off-diagonal blocks, mirrored below the diagonal
        H[e:, a:e].copy_(H[a:e, e:].t())
    return H, n + b


def diagonal_update(d: Tensor, n: int, x: Tensor) -> tuple[Tensor, int]:
    """``hessian_update`` for the diagonal alone: d = 2/n Σ x², what Wanda and OWL need (tokens·cols work
    instead of tokens·cols², and cols floats instead of cols²)."""
    b = x.shape[0]
    if b == 0:
        return d, n
    d.mul_(n / (n + b)).add_(x.to(d.dtype).pow(2).sum(0), alpha=2 / (n + b))
    return d, n + b


def layer_input_width(module: nn.Module) -> int:
    """in_features for nn.Linear; GPT-2's Conv1D stores its weight as (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]


class HessianCollector:
    """Context manager: hooks every given linear, accumulates one Hessian per input group (fp32, or fp64 for
    ``hessian_dtype="fp64"``: ``H`` holds the accumulators, ``hessian()`` gives the solvers' fp32).

    ``leader[name]`` is the linear whose Hessian ``name`` uses. Groups are decided on the first forward pass
    (inputs compared with ``is``); later passes accumulate only on each group's leader.
    """

    def __init__(self, linears: dict[str, nn.Module], hessian_dtype: str = "auto", diagonal: bool = False):
        self.linears = linears
        self.hessian_dtype = hessian_dtype
        self.diagonal = diagonal  # keep diag(H) only (1-D), for methods that need no more
        self.H: dict[str, Tensor] = {}
        self.n: dict[str, int] = {}
        self.leader: dict[str, str] = {}
        self._seen: list[tuple[str, Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> HessianCollector:
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def _hook(self, name: str):
        def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0]
            if name not in self.leader:
                same = next((lead for lead, seen in self._seen if seen is x), None)
                self.leader[name] = same or name
                if same is None:
                    self._seen.append((name, x))
                if len(self.leader) == len(self.linears):
                    self._seen.clear()  # groups known: drop the references to the first batch
            if self.leader[name] != name:
                return
            cols = layer_input_width(mod)
            if name not in self.H:
                shape = (cols,) if self.diagonal else (cols, cols)
                self.H[name] = torch.zeros(shape, dtype=accumulator_dtype(self.hessian_dtype), device=x.device)
                self.n[name] = 0
            flat = x.detach().reshape(-1, cols)
            if self.diagonal:
                self.H[name], self.n[name] = diagonal_update(self.H[name], self.n[name], flat)
            else:
                self.H[name], self.n[name] = hessian_update(self.H[name], self.n[name], flat, self.hessian_dtype)

        return hook

    def hessian(self, name: str) -> Tensor:
        lead = self.leader[name]
        self.H[lead] = as_solver_hessian(self.H[lead])  # rounded once, shared by the group
        return self.H[lead]

    def drop(self, leader: str) -> None:
        """Free a group's Hessian once every linear that reads it is solved."""
        del self.H[leader]

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, lead in self.leader.items():
            out.setdefault(lead, []).append(name)
        return out
