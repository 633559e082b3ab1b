"""The streaming engine: one decoder block on the device at a time, calibration activations carried between.

It knows nothing of pruning. It captures what the model feeds its first block, then for each block calls
``on_block`` (which may run the block over the data and change its weights) and re-runs the block to make
the next block's inputs; or, when ``on_block`` runs the block sublayer by sublayer
(``BlockPass.sequential``), that one pass's outputs are the next block's inputs and the block is not run
again. To stay architecture-agnostic it never re-implements a model's embeddings, masks, rotary tables,
final norm or head: it runs the model's own forward with light stand-ins in place of the blocks, which
record what each block is called with, or return injected hidden states to get logits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmprune.arch import find_blocks
from llmprune.errors import NonFiniteError, UsageError, overflow_hint
from llmprune.prefetch import BlockFetcher
from llmprune.progress import Progress, track

log = logging.getLogger(__name__)


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
    return bound(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def bound(device: torch.device | str) -> torch.device:
    """``cuda`` with the current device's index: the current device is per thread, so a worker thread (the
    sequential pass's batches) must be told which one, and Triton launches on the current device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def cuda_free(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can take: the driver's free memory plus what torch's caching
    allocator holds reserved but unused (``mem_get_info`` alone counts that as taken)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


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
    return 2 * nbytes < 0.4 * cuda_free(device)


class _Abort(Exception):
    """Raised inside a paused batch's forward when the pass is abandoned (an error elsewhere)."""


class _Batch(threading.Thread):
    """One batch's forward through one block, run on its own thread so it can stop before a module and be
    resumed later. Only one batch runs at a time (the caller hands control back and forth), so results are
    deterministic and the cores are not oversubscribed."""

    def __init__(self, run: Callable[[], object], device: torch.device):
        super().__init__(daemon=True, name="llmprune-sublayer")
        self._run, self._device = run, device
        self._threads = torch.get_num_threads()  # the caller's intra-op threads (the setting is per thread)
        self.go, self.back = threading.Semaphore(0), threading.Semaphore(0)
        self.at: str | None = None  # module it waits before, while paused
        self.x: Tensor | None = None  # that module's input
        self.out: object = None
        self.error: BaseException | None = None
        self.abort = False

    def run(self) -> None:
        self.go.acquire()
        try:
            torch.set_num_threads(self._threads)
            if self._device.type == "cuda" and self._device.index is not None:  # the current device is per thread
                torch.cuda.set_device(self._device)
            with torch.no_grad():  # grad mode is per thread
                self.out = self._run()
        except _Abort:
            pass
        except BaseException as exc:  # handed to the caller, raised there
            self.error = exc
        self.at, self.x = None, None
        self.back.release()

    def step(self) -> None:
        """Let this batch run until it pauses before a module or finishes."""
        self.go.release()
        self.back.acquire()

    def pause(self, name: str, x: Tensor) -> None:
        """Called on this batch's thread: wait before module ``name`` (input ``x``) until resumed."""
        self.at, self.x = name, x
        self.back.release()
        self.go.acquire()
        self.at, self.x = None, None
        if self.abort:
            raise _Abort


class BlockPass:
    """What ``on_block`` gets for one block: call it to run the block over every batch (outputs dropped), or
    ``sequential(...)`` to run it once, sublayer by sublayer, keeping the outputs for the next block."""

    def __init__(self, stream: Stream, i: int, block: nn.Module):
        self.stream, self.i, self.block = stream, i, block
        self.outputs: list[Tensor] | None = None  # set by sequential(): the block's outputs, on the store
        self.kept_peak_bytes = 0  # the largest set of inputs held across batches before one module
        # with a dense stream carried (Stream(carry_dense=True)): on_block sets this block's outputs on it
        self.dense_outputs: list[Tensor] | None = None

    def __call__(self) -> None:
        self.stream.forward_block(self.i, self.block, keep=False)

    @property
    def inputs(self) -> list[Tensor]:
        """This block's inputs, one tensor per batch, on the store."""
        return self.stream.hidden

    @property
    def dense_inputs(self) -> list[Tensor] | None:
        """The dense model's inputs of this block (carried beside the compressed stream), else None."""
        return self.stream.dense

    def run_batch(self, b: int, h: Tensor | None = None, block: nn.Module | None = None) -> Tensor:
        """The block's output (a tensor on the device) for batch ``b`` of ``h`` (default: its inputs), called
        with the batch's own masks and positions; gradients flow when enabled. ``block``: another module
        called in its place with the same arguments (e.g. the dense block's tensors)."""
        stream = self.stream
        call = stream.calls[tuple(stream.batches[b].shape)][self.i]
        x = (stream.hidden[b] if h is None else h).to(stream.device)
        out = (block or self.block)(x, *call.args, **call.kwargs)
        stream.tape.wrap = _wrap_like(out)
        return _unwrap(out)

    def forward(self, hidden: list[Tensor] | None = None, block: nn.Module | None = None) -> list[Tensor]:
        """The block's outputs (on the store) for every batch of ``hidden`` (default: its inputs)."""
        hidden = self.stream.hidden if hidden is None else hidden
        return [self.run_batch(b, h, block).to(self.stream.store) for b, h in enumerate(hidden)]

    def sequential_fits(self, modules: dict[str, nn.Module]) -> str | None:
        """None when a sequential pass's activations fit beside what is there, else why not.

        Every batch is held inside the block at once: its residual stream, the normed input, and the
        widest module's input and output; asked for at most half of what is free (device or host memory).
        """
        import psutil

        stream = self.stream
        h = stream.hidden[0]
        tokens = sum(int(ids.numel()) for ids in stream.batches)
        widest = max((max(m.weight.shape) for m in modules.values()), default=h.shape[-1])
        need = tokens * h.element_size() * (3 * h.shape[-1] + 2 * widest)
        if stream.device.type == "cuda":
            free = cuda_free(stream.device)
        else:
            free = psutil.virtual_memory().available
        if need > free // 2:
            return (f"a sequential pass would hold ~{need >> 20} MiB of activations, more than half of the"
                    f" {free >> 20} MiB free on {stream.device}")
        return None

    def sequential(self, modules: dict[str, nn.Module], on_group: Callable[[str, list[Tensor]], None]) -> None:
        """Run every batch through the block, all stopping before each of ``modules`` in turn.

        When every batch waits before module ``name`` (or has finished without reaching it), ``on_group(name,
        inputs)`` is called with that module's input from each batch that reached it, in batch order; it may
        change the module's weights, which the batches then use as they go on. The order is the data's: the
        modules are met as the block's own forward calls them, whatever the family. Batches whose control flow
        differs (one reaches module B while another waits before A) are served in the order the modules are
        registered in the block. A module called again after its turn is not paused at. The block's outputs
        are kept in ``outputs``.
        """
        stream, order = self.stream, list(modules)
        local = threading.local()
        served: set[str] = set()

        def hook(name: str):
            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                batch = getattr(local, "batch", None)
                if batch is not None and name not in served:
                    batch.pause(name, args[0] if args else next(iter(kwargs.values())))

            return pre

        def job(b: int, ids: Tensor, h: Tensor):
            def run():
                local.batch = workers[b]
                call = stream.calls[tuple(ids.shape)][self.i]
                return self.block(h.to(stream.device), *call.args, **call.kwargs)

            return run

        workers: list[_Batch] = []
        workers.extend(_Batch(job(b, ids, h), stream.device)
                       for b, (ids, h) in enumerate(zip(stream.batches, stream.hidden, strict=True)))
        handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
        try:
            for w in workers:
                w.start()
                w.step()
                self._raise(workers)
            while waiting := [w for w in workers if w.is_alive() and w.at is not None]:
                name = min({w.at for w in waiting}, key=order.index)
                group = [w for w in waiting if w.at == name]
                xs = [w.x for w in group]
                self.kept_peak_bytes = max(self.kept_peak_bytes, sum(x.numel() * x.element_size() for x in xs))
                on_group(name, xs)
                served.add(name)
                del xs
                for w in group:
                    w.step()
                    self._raise(workers)
        except BaseException:
            for w in workers:  # resume every paused batch into an _Abort, so no thread is left waiting
                if w.is_alive():
                    w.abort = True
                    w.go.release()
            raise
        finally:
            for handle in handles:
                handle.remove()
            for w in workers:
                if w.ident is not None:
                    w.join()
        outs = []
        for w in workers:
            stream.tape.wrap = _wrap_like(w.out)
            outs.append(_unwrap(w.out).to(stream.store))
        self.outputs = outs

    @staticmethod
    def _raise(workers: list[_Batch]) -> None:
        for w in workers:
            if w.error is not None:
                raise w.error


def _check_plain_weights(model: nn.Module) -> None:
    """The engine moves blocks between host and device and records them on streams: weights held as tensor
    subclasses (``llmprune.load(..., semi_structured=True)``'s 2:4 sparse weights) refuse ``record_stream``
    and would come back from the host densified."""
    for name, p in model.named_parameters():
        if type(p.data) is not torch.Tensor:
            raise UsageError(f"{name} is a {type(p.data).__name__}, which llmprune cannot stream block by block:"
                             " evaluate or compress the directory itself, or load it without semi_structured")


def check_finite_weights(module: nn.Module, prefix: str = "") -> None:
    """A NaN or inf among the input's weights, named before it spreads (one isfinite per tensor): past the
    first block it would surface as a wrong layer's indefinite Hessian. FP8 tensors (compressed-tensors scales and
    weights a loader kept compressed) are read as float32, which isfinite takes."""
    for name, p in module.named_parameters():
        if not p.is_floating_point() or p.device.type == "meta":
            continue
        if p.element_size() == 1:  # float8: no isfinite kernel
            p = p.float()
        if not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            full = f"{prefix}.{name}" if prefix else name
            raise NonFiniteError(f"{full} holds {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf) of"
                                 f" {p.numel()} in the input model: the checkpoint is damaged; re-download or"
                                 " re-convert it")


def check_finite_activations(where: str, hidden: list[Tensor]) -> None:
    """NaN or inf in ``where``'s activations (one isfinite per batch), named with whether the dtype overflowed."""
    if all(bool(torch.isfinite(h).all()) for h in hidden):
        return
    nan = sum(int(torch.isnan(h).sum()) for h in hidden)
    inf = sum(int(torch.isinf(h).sum()) for h in hidden)
    total = sum(h.numel() for h in hidden)
    raise NonFiniteError(f"{where} holds non-finite activations ({nan} NaN, {inf} inf of {total} values, in"
                         f" {str(hidden[0].dtype).removeprefix('torch.')}): {overflow_hint(hidden[0].dtype)}")


class Stream:
    """Streams ``batches`` (token ids, each (b, T)) through ``model`` block by block on ``device``."""

    def __init__(self, model: nn.Module, batches: list[Tensor], device: torch.device | str,
                 prefetch: bool | None = None, progress: Progress = True, captured: dict | None = None,
                 carry_dense: bool = False):
        self.model = model
        # carry the dense model's hidden states beside the compressed ones (block-wise reconstruction's target);
        # dropped, with the reason in dense_dropped, when two streams do not fit
        self.carry_dense = carry_dense
        self.dense: list[Tensor] | None = None
        self.dense_dropped: str | None = None
        _check_plain_weights(model)
        # block 0's inputs and the blocks' call arguments, shared by runs over the same batches (a sweep's
        # cells): filled by the first run's capture, read by the next instead of running the embeddings again
        self.captured = captured
        self.progress = progress  # a tqdm bar, nothing, or a callback fn(task, done, total) (progress.py)
        self.batches = batches
        self.device = bound(device)
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
            check_finite_weights(self.model)  # embeddings, final norm, head: the blocks stand in empty
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
        if self.carry_dense:
            self._start_dense()
        check_finite_activations(f"the input of {self.path}.0 (the embeddings' output)", self.hidden)

    def _start_dense(self) -> None:
        """The dense stream starts as the embeddings' output: where both streams fit (the device, else host
        memory with half of what is free to spare), or not at all."""
        import psutil

        total = sum(h.numel() * h.element_size() for h in self.hidden)
        if self.store.type == "cuda" and not _fits(2 * total, self.device):
            self.store = torch.device("cpu")
            self.hidden = [h.to(self.store) for h in self.hidden]
        if self.store.type == "cpu" and 2 * total > psutil.virtual_memory().available // 2:
            self.dense_dropped = (f"two streams of {total >> 20} MiB each do not fit in half of the"
                                  f" {psutil.virtual_memory().available >> 20} MiB free")
            log.warning("no dense stream carried: %s", self.dense_dropped)
            return
        self.dense = list(self.hidden)  # the same tensors until the first block: never written in place

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
    def run(self, on_block: Callable[[int, nn.Module, BlockPass], None] | None = None,
            desc: str = "blocks", after_block: Callable[[int, nn.Module], None] | None = None) -> list[Tensor]:
        """Capture, then per block: to device, ``on_block(i, block, block_pass)``, propagate (unless the block
        pass already did), check its outputs are finite, ``after_block(i, block)`` (e.g. write it: a block
        whose outputs overflowed is not kept), back to CPU (with ``prefetch``, the next block is readied
        meanwhile).

        Returns the hidden states after the last block (before the final norm), one tensor per batch.
        """
        source = getattr(self.model, "block_source", None)  # lazy models: weights read per block (lazy.py)
        if self.captured:
            self.hidden, self.calls, self.store = list(self.captured["hidden"]), self.captured["calls"], \
                self.captured["store"]
        else:
            with self.non_block_modules_on_device():
                self.capture()
            if self.captured is not None:
                self.captured.update(hidden=list(self.hidden), calls=self.calls, store=self.store)
        fetcher = BlockFetcher(self.blocks, source, self.device, ahead=self.prefetch)
        try:
            for i in track(range(len(self.blocks)), len(self.blocks), desc, self.progress):
                block = fetcher.get(i)
                check_finite_weights(block, f"{self.path}.{i}")
                block_pass = BlockPass(self, i, block)
                if on_block is not None:
                    on_block(i, block, block_pass)
                if block_pass.outputs is not None:  # run once, sublayer by sublayer: its outputs are ready
                    self.hidden = block_pass.outputs
                else:
                    self.hidden = self.forward_block(i, block, keep=True)
                check_finite_activations(f"the output of {self.path}.{i}", self.hidden)
                if self.dense is not None:  # only on_block knows the dense block: without it the stream ends
                    self.dense = block_pass.dense_outputs
                    if self.dense is None:
                        self.dense_dropped = f"block {i} gave no dense outputs"
                if after_block is not None:
                    after_block(i, block)
                fetcher.put_back(i)
        finally:
            fetcher.close()
        return self.hidden

    @torch.no_grad()
    def visit(self, on_block: Callable[[int, nn.Module, None], None], desc: str = "blocks",
              after_block: Callable[[int, nn.Module], None] | None = None) -> None:
        """Each block on the device in turn, for work that needs no data (magnitude, rtn): no capture, no
        forward. ``on_block(i, block, None)``, then ``after_block(i, block)``; lazily loaded blocks are read
        and put back as in ``run``."""
        source = getattr(self.model, "block_source", None)
        fetcher = BlockFetcher(self.blocks, source, self.device, ahead=self.prefetch)
        try:
            for i in track(range(len(self.blocks)), len(self.blocks), desc, self.progress):
                block = fetcher.get(i)
                check_finite_weights(block, f"{self.path}.{i}")
                on_block(i, block, None)
                if after_block is not None:
                    after_block(i, block)
                fetcher.put_back(i)
        finally:
            fetcher.close()

    @torch.no_grad()
    def logits(self, b: int, rows: slice = slice(None)) -> Tensor:
        """Logits of batch ``b`` (its windows ``rows``) from the streamed final hidden states, through the
        model's own head."""
        self.tape.inject = self.hidden[b][rows].to(self.device)
        try:
            with self._stand_ins():
                out = self.model(input_ids=self.batches[b][rows].to(self.device), use_cache=False)
        finally:
            self.tape.inject = None
        return out.logits


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered"
                         f" from 0: use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return bound(device)
