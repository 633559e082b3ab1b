"""The upper Cholesky factor of the damped inverse Hessian, with retries at higher damping.

Memory matters here: the widest layer's Hessian is the largest tensor of a run (OPT-175B's fc2 reads 49152
inputs: 9 GiB in fp32). The factor is formed in one buffer the size of H, in place (Cholesky, inverse,
Cholesky again), so a solve needs the caller's H plus one more, not the six copies a naive
``cholesky(H + λI)`` chain holds at its peak.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from llmprune.errors import CholeskyError, NonFiniteError


def dead_inputs(H: Tensor) -> Tensor:
    """Inputs never active in calibration (H_ii = 0): their weights are zeroed, their H_ii taken as 1."""
    return torch.diag(H) == 0


def prepare_weight(W: Tensor, dead: Tensor) -> Tensor:
    """An fp32 copy of W (the solver's working matrix) with the columns of dead inputs zeroed."""
    W = W.float().clone()
    W[:, dead] = 0
    return W


_LAST: dict[str, dict] = {}


def shared_factor(kind: str, H: Tensor, args: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, or what it returned for this very ``H`` (the same tensor, unmodified since) with the same
    ``args``: linears that read one input (q/k/v, gate/up) share one Hessian and are solved one after the
    other, so they share its factorisation too. One entry per ``kind``; it goes when H is freed, so a solve
    never keeps a factor alive past its Hessian.
    """
    entry = _LAST.get(kind)
    if entry is not None and entry["ref"]() is H and entry["version"] == H._version and entry["args"] == args:
        return entry["value"]
    _LAST.pop(kind, None)  # the old factor goes before the new one is formed
    value = compute()

    def forget(ref: weakref.ref) -> None:
        if _LAST.get(kind, {}).get("ref") is ref:
            del _LAST[kind]

    _LAST[kind] = {"ref": weakref.ref(H, forget), "version": H._version, "args": args, "value": value}
    return value


def inverse_hessian_cholesky(H: Tensor, damp_frac: float, retries: int = 3) -> tuple[Tensor, float, int]:
    """Upper U with Uᵀ U = (H' + λI)⁻¹, where H' is H with dead inputs' H_ii = 1 and λ = damp_frac · mean(diag H');
    on failure retry with 10× the damping. ``H`` is not modified.

    Returns (U, damp_frac used, retries needed). Never falls back to an identity Hessian: that would be
    magnitude pruning wearing SparseGPT's name.
    """
    if not bool(torch.isfinite(H).all()):  # no damping makes it definite: say why instead
        bad = int((~torch.isfinite(H)).sum())
        raise NonFiniteError(f"its Hessian holds {bad} non-finite entries (NaN or inf) of {H.numel()}: its"
                             " calibration inputs were not finite")
    diag = torch.diag(H).float()
    diag[diag == 0] = 1
    mean_diag = diag.mean()
    U = torch.empty(H.shape, dtype=torch.float32, device=H.device)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    frac = damp_frac
    for attempt in range(retries + 1):
        U.copy_(H)
        U.diagonal().copy_(diag).add_(frac * mean_diag)
        torch.linalg.cholesky_ex(U, out=(U, info))  # L, in place
        if int(info) == 0:
            torch.cholesky_inverse(U, out=U)  # (H' + λI)⁻¹, in place
            torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
            if int(info) == 0 and torch.isfinite(U).all():
                return U, frac, attempt
        frac *= 10
    raise CholeskyError(
        f"Hessian is not positive definite even at damp_frac={frac / 10:g}: pass more calibration samples"
        " (--nsamples) or a larger --damp"
    )
