"""N:M patterns and exact prune counts: the sparsity vocabulary the solvers, kernels and recipes share."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from llmprune.errors import UsageError


@dataclass(frozen=True)
class Pattern:
    """N:M semi-structured sparsity: at most ``n`` nonzeros in every ``m`` consecutive weights of a row."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str | None) -> Pattern | None:
    """``"unstructured"`` (or None) -> None; ``"2:4"`` -> Pattern(2, 4)."""
    if text is None or str(text).strip().lower() in ("", "unstructured", "none"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise UsageError(f"malformed pattern {text!r}: use 'unstructured' or N:M such as 2:4 or 4:8")
    n, m = int(match.group(1)), int(match.group(2))
    if not (0 < n < m):
        raise UsageError(f"malformed pattern {text!r}: N:M needs 0 < N < M (e.g. 2:4 keeps 2 of every 4)")
    return Pattern(n, m)


def n_pruned(sparsity: float, numel: int) -> int:
    """floor(sparsity * numel), computed exactly (0.29 * 100 is 29, not 28.999...)."""
    return math.floor(Fraction(str(sparsity)) * numel)
