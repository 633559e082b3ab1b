"""Round to nearest: quantization with no error feedback, the baseline GPTQ and joint SparseGPT must beat.

Wanda and magnitude masks are followed by it when the recipe quantizes; ``--method rtn`` is the magnitude
solver (a magnitude mask, none at sparsity 0) with quantization required.
"""

from __future__ import annotations

from torch import Tensor

from llmprune.quant import QuantSpec, rtn
from llmprune.solvers.result import SolveResult, output_error


def then_rtn(W: Tensor, res: SolveResult, quant: QuantSpec | None, H: Tensor | None) -> SolveResult:
    """Quantize a pruned result's weights to nearest on per-group min/max (or mse) grids; zeros stay 0.

    The error is attributed by the two steps' own losses: pruning W -> Wp, rounding Wp -> Wq."""
    if quant is None:
        return res
    Wq, params = rtn(res.weight, quant)
    share = None
    if H is not None and H.dim() == 2:  # a diagonal alone (wanda) does not give the output error
        q, p = output_error(res.weight, Wq, H), output_error(W, res.weight, H)
        share = q / (q + p) if q + p > 0 else None
    return SolveResult(weight=Wq, mask=res.mask, damp_frac=res.damp_frac, retries=res.retries, quant=params,
                       quant_share=share)

