"""The report of a compression run, typed: what ``llmprune.compress`` returns and ``llmprune.json`` holds."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from llmprune.checkpoint import REPORT, read_report
from llmprune.errors import UsageError
from llmprune.solve import LayerReport


@dataclass
class Report:
    """What a compression run did: the content of ``llmprune.json``, typed. ``to_dict()`` is that file.

    ``module`` and ``tokenizer`` (not part of the file) hold the compressed model in memory when the run had
    it there (an in-memory model, or no ``out``); a streamed run leaves them None: load ``out`` instead.
    """

    recipe: dict[str, Any]
    device: str
    calibration: dict[str, Any]
    global_sparsity: float  # zeros / weights over every linear meant to be pruned (never-called ones as dense)
    target_sparsity: float
    pruned_params: int  # weights in the compressed linears
    layers: list[LayerReport]
    allocation: dict[str, Any] | None
    timings: dict[str, float]
    # linears by the implementation of their column loop ("triton": the fused kernel, "torch"); and kernel ->
    # error for each Triton kernel that failed on the device, after which its torch twin ran
    kernels_used: dict[str, int] = field(default_factory=dict)
    kernel_fallbacks: dict[str, str] = field(default_factory=dict)
    # sequential runs: blocks that fell back to two passes (and why), the peak of the inputs kept across
    # batches before one sublayer, where activations were kept; None for two-pass runs
    sequential: dict[str, Any] | None = None
    # --reconstruct: the spec, each block's loss before and after, steps, seconds, memory; blocks reverted (the
    # training did not lower their loss) and not reached; None when off
    reconstruction: dict[str, Any] | None = None
    # what was left dense and why: skipped (--skip), never_called (no data), routers, unsupported_experts
    left_dense: dict[str, list[str]] = field(default_factory=dict)
    # mixture-of-experts models: expert matrices, their routed token counts, the magnitude fallbacks, and
    # with --drop-experts the experts dropped per layer and their REAP scores; None for dense models
    experts: dict[str, Any] | None = None
    model: dict[str, Any] = field(default_factory=dict)  # source, kind, type, dtype
    versions: dict[str, str] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None  # format, bits_per_weight, bytes; None when nothing was written
    extra: dict[str, Any] = field(default_factory=dict)  # other entries (e.g. ``pack`` after llmprune pack)
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra", "module", "tokenizer")}
        out["layers"] = [dataclasses.asdict(r) for r in self.layers]
        return json.loads(json.dumps(out | self.extra, default=str))  # plain JSON types, as in the file

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "module", "tokenizer"}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["layers"] = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in data.get("layers", [])]
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, directory: str | Path) -> Report:
        """The report of a directory written by ``compress``."""
        data = read_report(Path(directory))
        if data is None:
            raise UsageError(f"{directory} holds no {REPORT}: pass a directory written by llmprune compress")
        return cls.from_dict(data)
