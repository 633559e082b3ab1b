"""SPDY's plumbing: the solved layer versions kept on disk, and models assembled from them scored by their
calibration loss, streamed through the engine (the search itself is allocate.spdy_search)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmprune import allocate, distributed
from llmprune.allocate import AllocationSpec
from llmprune.arch import get_weight, set_weight
from llmprune.data import batched
from llmprune.engine import Stream
from llmprune.progress import Progress, track
from llmprune.targets import on_device

log = logging.getLogger(__name__)


class VersionStore:
    """Every linear's solved weights at every candidate sparsity, for SPDY to assemble models from: one
    safetensors file per block in a temporary directory (fp32 weights kept as fp16), so host memory holds one
    block's versions at a time. The disk it takes is about (candidates/2) x the model's linear weights in
    fp32 (x candidates in fp16/bf16): set TMPDIR to a roomy disk for large models."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="llmprune-spdy-"))

    def put(self, i: int, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        small = {k: (t.half() if t.dtype == torch.float32 and not k.endswith("@dense") else t).contiguous().cpu()
                 for k, t in tensors.items()}  # the dense weights exactly, to give an in-memory model back
        save_file(small, str(self.dir / f"block-{i:05d}.safetensors"))

    def get(self, i: int, keys: list[str]) -> dict[str, Tensor]:
        """Block ``i``'s versions named ``keys`` (``name@sparsity`` / ``name@dense``), the others not read."""
        from safetensors import safe_open

        path = self.dir / f"block-{i:05d}.safetensors"
        if not path.is_file():
            return {}
        with safe_open(str(path), "pt") as f:
            have = set(f.keys())
            return {k: f.get_tensor(k) for k in keys if k in have}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def calibration_loss(model: nn.Module, batches: list[Tensor], device: torch.device, on_block,
                     captured: dict | None = None) -> float:
    """Mean next-token NLL of the model over ``batches``, streamed; ``on_block(i, block, block_pass)`` may
    change a block's weights just before it feeds the next (SPDY assembles each candidate model this way;
    owl's λ trials compress it)."""
    stream = Stream(model, batches, device, progress=False, captured=captured)
    stream.run(on_block, desc="score")
    total, count = 0.0, 0
    with stream.non_block_modules_on_device(), torch.no_grad():
        for b, ids in enumerate(batches):
            logits = stream.logits(b).float()
            ids = ids.to(logits.device)
            for r in range(len(ids)):  # window by window: logits[r, :-1] is contiguous, no (tokens x vocab) copy
                total += float(F.cross_entropy(logits[r, :-1], ids[r, 1:], reduction="sum"))
            count += ids[:, 1:].numel()
    total, count = distributed.all_sum([total, float(count)])  # torchrun: each rank scored its share
    return total / count


class Assembler:
    """Models assembled from the stored versions (each linear at its allocation's sparsity) and scored by
    their calibration loss on the first ``spdy_samples`` windows, streamed; ``restore`` puts an in-memory
    model's weights back to dense (a lazily loaded one reads its blocks anew on every pass)."""

    def __init__(self, model: nn.Module, windows: Tensor, alloc: AllocationSpec, batch_size: int,
                 linears: dict[str, dict[str, nn.Module]], device: torch.device, store: VersionStore):
        self.model, self.linears, self.device, self.store = model, linears, device, store
        self.prefixes = list(linears)
        self.batches = batched(distributed.shard(windows[: alloc.spdy_samples]), batch_size)
        self.captured: dict = {}
        self.lazy = getattr(model, "block_source", None) is not None

    def _on_block(self, alloc: dict[str, float] | None):
        """Set each linear to its version at ``alloc``'s sparsity; None: back to dense (in-memory models)."""
        def on_block(i: int, block: nn.Module, _=None) -> None:
            p = self.prefixes[i]
            with on_device(block, self.linears[p]) as lin:
                keys = {n: f"{p}.{n}@{alloc[f'{p}.{n}']}" if alloc is not None and f"{p}.{n}" in alloc
                        else f"{p}.{n}@dense" for n in lin}
                versions = self.store.get(i, list(keys.values()))
                for n, m in lin.items():
                    if keys[n] in versions:
                        set_weight(m, versions[keys[n]].to(get_weight(m).dtype))

        return on_block

    def loss(self, alloc: dict[str, float]) -> float:
        return calibration_loss(self.model, self.batches, self.device, self._on_block(alloc), self.captured)

    def restore(self) -> None:
        if not self.lazy:
            dense = self._on_block(None)
            Stream(self.model, [], self.device, progress=False).visit(dense)


def search(model: nn.Module, windows: Tensor, alloc: AllocationSpec, batch_size: int,
           linears: dict[str, dict[str, nn.Module]], device: torch.device, tables: dict[str, dict],
           store: VersionStore, progress: Progress, starts: dict[str, dict[str, float]] | None = None) -> dict:
    """SPDY's search over the measured tables: each candidate allocation assembled from the stored versions
    and scored by its calibration loss on the first ``spdy_samples`` windows (allocate.spdy_search);
    ``starts``: further named starting allocations (OWL's)."""
    assembler = Assembler(model, windows, alloc, batch_size, linears, device, store)
    n = alloc.spdy_steps + 2 + len(starts or {})
    it = iter(track(range(n), n, "spdy search", progress, unit="candidate"))

    def score(alloc: dict[str, float]) -> float:
        next(it, None)
        return assembler.loss(alloc)

    if alloc.bits:  # the saving against the widest grid (the tables' costs), never under the budget's
        target = 1 - alloc.target / max(alloc.bits)
        uniform = allocate.bit_key(int(alloc.target)) if float(alloc.target).is_integer() else None
    else:
        target, uniform = alloc.target, None
    try:
        found = allocate.spdy_search(tables, target, score, alloc.spdy_steps, seed=alloc.seed,
                                     starts=starts, uniform=uniform)
    finally:
        assembler.restore()  # every weight back to dense before the compression run
    kept = sum(1 for h in found["history"] if h.get("kept") and h["step"] > 0)
    log.info("spdy: calibration loss %.4f after %d candidates (%d improvements; started from %s)", found["loss"],
             len(found["history"]), kept, found["anchor"])
    if alloc.bits:
        keys = found.pop("sparsities")
        bits = {n: allocate.bit_of(k) for n, k in keys.items()}
        numel = sum(int(t["numel"]) for t in tables.values())
        found |= {"choices": list(alloc.bits), "bits": bits,
                  "average_bits": sum(b * int(tables[n]["numel"]) for n, b in bits.items()) / numel}
    return {"method": "spdy", "target": alloc.target, "tables": tables, **found}

