"""Layer solvers: pure functions (W, H, sparsity, pattern, quant) -> SolveResult. No hooks, no module state.

``SOLVERS`` is the only indirection: the engine looks a method up by its CLI name.
"""

from __future__ import annotations

from collections.abc import Callable

from llmprune.solvers.admm import admm
from llmprune.solvers.magnitude import magnitude, round_to_nearest
from llmprune.solvers.obc import obc
from llmprune.solvers.result import SolveResult
from llmprune.solvers.sparsegpt import sparsegpt
from llmprune.solvers.wanda import wanda

Solver = Callable[..., SolveResult]

SOLVERS: dict[str, Solver] = {
    "sparsegpt": sparsegpt,
    "wanda": wanda,
    "magnitude": magnitude,
    "rtn": round_to_nearest,
    "admm": admm,
    "obc": obc,
}

__all__ = ["SOLVERS", "SolveResult", "Solver", "admm", "magnitude", "obc", "round_to_nearest", "sparsegpt", "wanda"]
