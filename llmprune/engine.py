"""The streaming engine: one decoder block on the device at a time, calibration activations carried between.

It knows nothing of pruning. It captures what the model feeds its first block, then for each block calls
``on_block`` (which may run the block over the data and change its weights) and re-runs the block to make
the next block's inputs. To stay architecture-agnostic it never re-implements a model's embeddings, masks,
rotary tables, final norm or head: it runs the model's own forward with light stand-ins in place of the
blocks, which record what each block is called with, or return injected hidden states to get logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmprune.arch import find_blocks
from llmprune.prefetch import BlockFetcher
from llmprune.progress import Progress, track


class _Stop(Exception):
    """Raised by the last stand-in: nothing after the blocks is needed while recording."""


@dataclass
class BlockCall:
    """Everything a block is called with besides its hidden states (masks, positions, rotary, flags)."""

    args: tuple
    kwargs: dict


@dataclass
class _Tape:
    n_blocks: int
    recording: bool = False
    calls: list[BlockCall | None] = field(default_factory=list)
    first_input: Tensor | None = None
    inject: Tensor | None = None
    wrap: Callable[[Tensor], object] = lambda h: h


class _StandIn(nn.Module):
    """Takes a block's place in its ModuleList; owns no parameters, so model.to() skips the real block."""

    def __init__(self, block: nn.Module, index: int, tape: _Tape):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered: stays where it is
        self.index = index
        self.tape = tape

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)  # e.g. attention_type

    def forward(self, *args, **kwargs):
        tape = self.tape
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        last = self.index == tape.n_blocks - 1
        if tape.recording:
            tape.calls[self.index] = BlockCall(rest, kwargs)
            if self.index == 0:
                tape.first_input = hidden
            if last:
                raise _Stop
            return hidden
        if last and tape.inject is not None:
            return tape.wrap(tape.inject)
        return hidden


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unwrap(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _wrap_like(out: object) -> Callable[[Tensor], object]:
    """Blocks return a tensor or a tuple (BLOOM: (hidden, attn)); the stand-ins must answer in kind."""
    if isinstance(out, tuple | list):
        tail = (None,) * (len(out) - 1)
        return lambda h: (h, *tail)
    return lambda h: h


def _fits(nbytes: int, device: torch.device) -> bool:
    """Keep activations (inputs and outputs of a block) on a CUDA device only if they use < 40% of free."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * nbytes < 0.4 * free


class Stream:
    """Streams ``batches`` (token ids, each (b, T)) through ``model`` block by block on ``device``."""

    def __init__(self, model: nn.Module, batches: list[Tensor], device: torch.device | str,
                 prefetch: bool | None = None, progress: Progress = True):
        self.model = model
        self.progress = progress  # a tqdm bar, nothing, or a callback fn(task, done, total) (progress.py)
        self.batches = batches
        self.device = torch.device(device)
        # ready the next block (read, pinned, copied) while this one runs; default: on CUDA (prefetch.py)
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.path, self.blocks = find_blocks(model)
        self.tape = _Tape(n_blocks=len(self.blocks))
        self.calls: dict[tuple, list[BlockCall]] = {}  # batch shape -> per-block calls
        self.hidden: list[Tensor] = []
        self.store = self.device

    @contextlib.contextmanager
    def _stand_ins(self) -> Iterator[None]:
        real = list(self.blocks)
        for i, block in enumerate(real):
            self.blocks[i] = _StandIn(block, i, self.tape)
        try:
            yield
        finally:
            for i, block in enumerate(real):
                self.blocks[i] = block

    @contextlib.contextmanager
    def non_block_modules_on_device(self) -> Iterator[None]:
        """Embeddings, rotary, final norm and head on the device; the blocks stay where they are.

        A lazily loaded model's source reads them for the duration and drops them after (lazy.py).
        """
        source = getattr(self.model, "block_source", None)
        if source is not None:
            source.load_rest(self.model)
        with self._stand_ins():
            self.model.to(self.device)
        try:
            yield
        finally:
            with self._stand_ins():
                self.model.to("cpu")
            if source is not None:
                source.release_rest(self.model)

    @torch.no_grad()
    def capture(self) -> None:
        """Inputs of block 0 for every batch, and each block's call arguments for each batch shape."""
        tape = self.tape
        self.hidden = []
        with self._stand_ins():
            for ids in self.batches:
                shape = tuple(ids.shape)
                tape.recording = True
                tape.calls = [None] * tape.n_blocks
                tape.first_input = None
                with contextlib.suppress(_Stop):
                    self.model(input_ids=ids.to(self.device), use_cache=False)
                tape.recording = False
                if shape not in self.calls:
                    self.calls[shape] = list(tape.calls)
                h = tape.first_input
                if not self.hidden:
                    total = h.numel() * h.element_size() * len(self.batches)
                    self.store = self.device if _fits(total, self.device) else torch.device("cpu")
                self.hidden.append(h.to(self.store))
            tape.calls = []

    def forward_block(self, i: int, block: nn.Module, keep: bool) -> list[Tensor]:
        """Run block ``i`` over every batch; return the outputs (on the store device) if ``keep``."""
        outs = []
        for ids, h in zip(self.batches, self.hidden, strict=True):
            call = self.calls[tuple(ids.shape)][i]
            out = block(h.to(self.device), *call.args, **call.kwargs)
            self.tape.wrap = _wrap_like(out)
            if keep:
                outs.append(_unwrap(out).to(self.store))
        return outs

    @torch.no_grad()
    def run(self, on_block: Callable[[int, nn.Module, Callable[[], None]], None] | None = None,
            desc: str = "blocks") -> list[Tensor]:
        """Capture, then per block: to device, ``on_block(i, block, forward_all)``, propagate, back to CPU
        (with ``prefetch``, the next block is readied meanwhile).

        Returns the hidden states after the last block (before the final norm), one tensor per batch.
        """
        source = getattr(self.model, "block_source", None)  # lazy models: weights read per block (lazy.py)
        with self.non_block_modules_on_device():
            self.capture()
        fetcher = BlockFetcher(self.blocks, source, self.device, ahead=self.prefetch)
        try:
            for i in track(range(len(self.blocks)), len(self.blocks), desc, self.progress):
                block = fetcher.get(i)
                if on_block is not None:
                    on_block(i, block, lambda i=i, block=block: self.forward_block(i, block, keep=False))
                self.hidden = self.forward_block(i, block, keep=True)
                fetcher.put_back(i)
        finally:
            fetcher.close()
        return self.hidden

    @torch.no_grad()
    def logits(self, b: int) -> Tensor:
        """Logits of batch ``b`` from the streamed final hidden states, through the model's own head."""
        self.tape.inject = self.hidden[b].to(self.device)
        try:
            with self._stand_ins():
                out = self.model(input_ids=self.batches[b].to(self.device), use_cache=False)
        finally:
            self.tape.inject = None
        return out.logits
