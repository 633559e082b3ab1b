"""Getting decoder blocks onto the device, the next one while the current one is worked on.

Readying a block means reading its weights (from the shards, for a lazily loaded model) and copying them to
the device. Done in line, the device idles for both; at 175B scale a block is 3.6 GB in fp16, a few seconds
of disk and PCIe per block. With ``ahead`` a worker thread readies block i+1 while the engine runs block i;
on CUDA it copies from pinned memory on its own stream, so the transfer overlaps the compute kernels too, and
it waits for its copies before handing the block over, so the block is complete when the engine gets it.

Host memory: two blocks at most (the current one and the next). Without a GPU there is nothing to overlap
with (the solver uses every core), so the engine asks for ``ahead`` only on CUDA.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn


class BlockFetcher:
    """``get(i)``: block ``i`` with its weights on ``device``; ``put_back(i)``: to the host and, for a lazy
    model, back to disk (the source drops its tensors)."""

    def __init__(self, blocks: nn.ModuleList | list[nn.Module], source, device: torch.device, ahead: bool):
        self.blocks = blocks
        self.source = source  # lazy.BlockSource or None (blocks already in host memory)
        self.device = device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llmprune-prefetch") if ahead else None
        self.copy_stream = torch.cuda.Stream(device) if ahead and device.type == "cuda" else None
        self.pending: dict[int, Future] = {}
        self.out: set[int] = set()  # blocks handed out and not put back yet

    def _ready(self, i: int) -> None:
        block = self.blocks[i]
        if self.source is not None:
            self.source.load(i, block)
        if self.copy_stream is None:
            block.to(self.device)
            return
        with torch.cuda.stream(self.copy_stream):
            block._apply(lambda t: t.pin_memory().to(self.device, non_blocking=True) if t.device.type == "cpu" else t)
        self.copy_stream.synchronize()  # complete before the engine's stream reads it

    def get(self, i: int) -> nn.Module:
        pending = self.pending.pop(i, None)
        if pending is not None:
            pending.result()  # re-raises the worker's error (a missing tensor, a bad shard)
        else:
            self._ready(i)
        block = self.blocks[i]
        self.out.add(i)
        if self.copy_stream is not None:  # allocated on the copy stream, used on the engine's
            main = torch.cuda.current_stream(self.device)
            for t in (*block.parameters(), *block.buffers()):
                if t.is_cuda:
                    t.record_stream(main)
        if self.pool is not None and i + 1 < len(self.blocks):
            self.pending[i + 1] = self.pool.submit(self._ready, i + 1)
        return block

    def put_back(self, i: int) -> None:
        self.out.discard(i)
        block = self.blocks[i]
        block.to("cpu")
        if self.source is not None:
            self.source.release(i, block)

    def close(self) -> None:
        """Put back what a run that stopped early (an error, Ctrl-C) left out: the block it was working on and
        the one being readied, so the model is as it was (on the host, or back on disk)."""
        for i, pending in self.pending.items():
            try:
                pending.result()
            except Exception:  # noqa: BLE001 -- the run is already ending with its own error
                continue
            self.out.add(i)
        self.pending.clear()
        for i in sorted(self.out):
            self.put_back(i)
        if self.pool is not None:
            self.pool.shutdown(wait=True)
