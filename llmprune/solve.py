"""Solving one linear: the spec's solver on its weights and Hessian, the new weights written back, and its
report (the relative output error, from the sweep's own OBS losses where it has them)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmprune import kernels
from llmprune.arch import get_weight, set_weight
from llmprune.errors import CholeskyError, NonFiniteError, overflow_hint
from llmprune.pattern import Pattern
from llmprune.quant import QuantParams, QuantSpec, stored_bits
from llmprune.solvers import SOLVERS
from llmprune.solvers.hinv import dead_inputs, prepare_weight
from llmprune.solvers.refit import refit_result
from llmprune.solvers.result import output_error, relative_error
from llmprune.solvers.sparsegpt import SparseGPTOptions, sparsegpt_levels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveSpec:
    """What solves one linear: the method, its own options, the pattern and grid it solves to."""

    method: str  # a key of solvers.SOLVERS
    # the method's own options (solvers/<method>.py: SparseGPTOptions, AdmmOptions, ObcOptions); None: it has
    # none (wanda, magnitude, rtn)
    options: SparseGPTOptions | None = None
    pattern: Pattern | None = None
    quant: QuantSpec | None = None
    # the SparseGPT/GPTQ sweep's options: sparsegpt's own, the sweep that quantizes a refit's mask, spdy's
    # levels
    sweep: SparseGPTOptions = field(default_factory=SparseGPTOptions)
    refit_iters: int | None = None  # re-solve the kept weights of the mask (PCG steps); None: no refit
    fallback: str = "magnitude"  # the data-free solver of an expert with too few calibration tokens
    diagonal_only: bool = False  # the solver reads only the Hessian's diagonal (Wanda's ‖X_j‖²)
    data_free: bool = False  # the solver reads no Hessian (magnitude, rtn without refit)

    def kwargs(self) -> dict:
        """The solver's keyword arguments."""
        return self.options.kwargs() if self.options is not None else {}


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    zeros: int  # exact count of zero weights after pruning
    sparsity: float  # zeros / numel
    rel_error: float | None  # ||WX - ŴX||² / ||WX||² on the calibration inputs
    quant_error: float | None  # the part of rel_error due to rounding the kept weights, by the steps' losses
    bits: float | None  # bits per weight as stored (codes + scales + zero points), None: not quantized
    damp_frac: float
    retries: int
    seconds: float
    hessian_of: str | None  # the linear whose (shared) Hessian this one used
    iterations: int | None = None  # admm / refit: iterations run
    # admm: its error over its SparseGPT warm start's (≤ 1: never worse on the layer's objective)
    vs_sparsegpt: float | None = None
    method: str | None = None  # the solver used (an expert with too few tokens: magnitude, not the recipe's)
    tokens: int | None = None  # calibration tokens its Hessian came from (an expert: those routed to it)
    # the implementation of its sweep's column loop (llmprune/kernels/obs_update.py): "triton" (the fused kernel),
    # "torch", or "torch+triton" (the kernel failed on the device mid-layer); None: the solver has no sweep
    kernel: str | None = None
    error_seconds: float | None = None  # measuring rel_error (after the solve's ``seconds``)


def solve_linear(
    full: str, mod: nn.Module, H: Tensor | None, spec: SolveSpec, sparsity: float, hessian_of: str | None,
    grids: dict[str, QuantParams] | None = None, tokens: int | None = None, method: str | None = None,
) -> LayerReport:
    """One solver call on one linear: its new weights written back, its grid kept, its report returned.

    ``method`` overrides the spec's (an expert with too few calibration tokens is pruned by magnitude; its
    few-token Hessian, when there is one, still measures the error); ``tokens``: the Hessian's token count.
    """
    method = method or spec.method
    W = get_weight(mod)
    H = H.to(W.device) if H is not None else None
    if H is not None and not bool(torch.isfinite(H).all()):  # the inputs overflowed inside the block
        bad = int((~torch.isfinite(H)).sum())
        raise NonFiniteError(f"{full}: its inputs on the calibration data are not finite ({bad} NaN or inf entries"
                             f" in its Hessian, of {H.numel()}): {overflow_hint(W.dtype)}")
    t0 = time.perf_counter()
    before = kernels.launches()
    try:
        res = SOLVERS[method](W, H, sparsity, spec.pattern, spec.quant, **spec.kwargs())
        if spec.refit_iters is not None and H is not None and method == spec.method:
            if spec.quant is None:
                res = refit_result(W, H, res, spec.refit_iters, res.damp_frac or spec.sweep.damp_frac)
            else:  # rounding would undo a real-valued refit: the GPTQ sweep compensates on the mask instead
                res = SOLVERS["sparsegpt"](W, H, sparsity, None, spec.quant, **spec.sweep.kwargs(), mask=res.mask)
    except CholeskyError as exc:
        raise CholeskyError(f"{full}: {exc}") from None
    except NonFiniteError as exc:
        raise NonFiniteError(f"{full}: {exc}") from None
    if not bool(torch.isfinite(res.weight).all()):  # never a NaN in an output
        bad = int((~torch.isfinite(res.weight)).sum())
        raise NonFiniteError(f"{full}: its {method} solve gave {bad} non-finite weights from finite ones, in"
                             f" {str(res.weight.dtype).removeprefix('torch.')}: {overflow_hint(res.weight.dtype)}")
    if W.device.type == "cuda":
        torch.cuda.synchronize(W.device)
    seconds = time.perf_counter() - t0
    whole_h = H is not None and H.dim() == 2  # a diagonal alone (wanda) does not give the output error
    den = output_error(W, W.new_zeros(()), H) if whole_h else 0.0
    num = _solved_error(W, H, res) if whole_h else 0.0
    err = num / den if den > 0 else None
    error_seconds = time.perf_counter() - t0 - seconds
    q_err = err * res.quant_share if err is not None and res.quant_share is not None else None
    zeros = int((res.weight == 0).sum())
    if res.quant is not None and grids is not None:
        grids[full] = res.quant.to("cpu")
    set_weight(mod, res.weight)
    if res.retries:
        log.warning("%s: the damped Hessian needed %d retries; solved with damping %g x its mean diagonal",
                    full, res.retries, res.damp_frac)
    return LayerReport(
        name=full,
        shape=tuple(W.shape),
        zeros=zeros,
        sparsity=zeros / W.numel(),
        rel_error=err,
        quant_error=q_err,
        bits=stored_bits(res.quant, tuple(W.shape), W.element_size()) if res.quant is not None else None,
        damp_frac=res.damp_frac,
        retries=res.retries,
        seconds=round(seconds, 4),
        error_seconds=round(error_seconds, 4),
        hessian_of=hessian_of,
        iterations=res.iterations,
        vs_sparsegpt=num / res.warm_error if res.warm_error and whole_h else None,
        method=method,
        tokens=tokens,
        kernel="+".join(kernels.summary(before).get("obs_update", {})) or None,
    )


def _swept(W: Tensor, H: Tensor) -> tuple[Tensor, float]:
    """What the sweep solved, for ``_sweep_error``: W with dead inputs' columns zeroed, and the mean diagonal its
    damping was taken from (dead inputs' H_ii as 1)."""
    dead = dead_inputs(H)
    return prepare_weight(W, dead), float(torch.diagonal(H).float().masked_fill(dead, 1).mean())


def _solved_error(W: Tensor, H: Tensor, res, swept: tuple[Tensor, float] | None = None) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) of a solve: from the sweep's own account where the weights are its fp32 result (a
    16-bit model's are rounded after it), else one product. ``swept``: ``_swept(W, H)`` if already made."""
    if res.obs_loss is not None and res.weight.dtype == torch.float32:
        return _sweep_error(*(swept or _swept(W, H)), res)
    return output_error(W, res.weight, H)


def _sweep_error(Wp: Tensor, mean_diag: float, res) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) of a SparseGPT sweep's result from its own OBS losses, which sum to the same trace
    under the damped H it solved with: minus λ||W - Ŵ||², that is the undamped error, with no (rows x cols²)
    product (dead inputs' columns count as the sweep saw them: zero on both sides). ``Wp, mean_diag``: ``_swept``."""
    lam = res.damp_frac * mean_diag
    return max(res.obs_loss - lam * float((Wp - res.weight.float()).square().sum()), 0.0)


# stacked copies of one weight that sparsegpt_levels may sweep at once (bytes of fp32)
LEVELS_BYTES = 256 << 20


def solve_levels(W: Tensor, H: Tensor, sparsities: list[float],
                 spec: SolveSpec) -> list[tuple[float, Tensor, float]]:
    """The spec's solver on one linear at each of ``sparsities`` (unstructured): [(sparsity, weights,
    relative output error ||WX - ŴX||² / ||WX||²)]. SparseGPT solves several sparsities per sweep
    (``sparsegpt_levels``, stacked up to LEVELS_BYTES) and its error comes from the sweep's own OBS losses,
    tr(D (H + λI) Dᵀ) for D = W - Ŵ, less λ||D||²: the same number ``relative_error`` gives, without one
    (rows x cols²) product per level. What SPDY's plan pass spent most of its time on (one sweep and one
    error product per level) costs about one sweep on small layers. Other solvers: one call and one error
    per sparsity."""
    if spec.method != "sparsegpt":
        solver = SOLVERS[spec.method]
        out = []
        for s in sparsities:
            res = solver(W, H, s, None, spec.quant, **spec.kwargs())
            out.append((s, res.weight, relative_error(W, res.weight, H)))
        return out
    Wp, mean_diag = _swept(W, H)  # once for every level
    den = output_error(Wp, Wp.new_zeros(()), H)
    per = max(1, LEVELS_BYTES // (W.numel() * 4))
    out = []
    for a in range(0, len(sparsities), per):
        chunk = sparsities[a : a + per]
        for s, r in zip(chunk, sparsegpt_levels(W, H, chunk, spec.quant, **spec.sweep.kwargs()), strict=True):
            num = _sweep_error(Wp, mean_diag, r)
            out.append((s, r.weight, num / den if den > 0 else 0.0))
    return out


def solve_bits(W: Tensor, H: Tensor, sparsity: float, quants: dict[str, QuantSpec],
               spec: SolveSpec) -> list[tuple[str, Tensor, float]]:
    """The spec's solver on one linear on each grid of ``quants`` (key -> grid, e.g. "w3" -> 3-bit), at the
    run's ``sparsity`` and pattern: [(key, weights, relative output error)], the error from the GPTQ sweep's
    own OBS losses where it has them (as ``solve_levels``). SPDY's tables over bit-widths."""
    solver = SOLVERS[spec.method]
    swept = _swept(W, H)  # once for every grid
    den = output_error(W, W.new_zeros(()), H)
    out = []
    for key, quant in quants.items():
        res = solver(W, H, sparsity, spec.pattern, quant, **spec.kwargs())
        out.append((key, res.weight, _solved_error(W, H, res, swept) / den if den > 0 else 0.0))
    return out
