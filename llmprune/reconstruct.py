"""Block-wise reconstruction: after a block's linears are solved one by one, train what they kept against the
block's own output (EBFT, Guo et al. 2024; AutoRound for the quantized case).

Every layer-wise solver minimises one linear's error on that linear's inputs; what the softmax, the gated
activation, the norms and the residual make of those errors is left. Here the block as a whole is trained:
``min ‖block_Ŵ(x) − y‖² / ‖y‖²`` over the calibration windows, with Adam on fp32 master copies of the kept
weights. Masks are fixed (a pruned weight stays zero, so N:M groups hold). A quantized weight keeps its
codes and its grid's scales are trained instead (one per row and group, rounded each step to what the
checkpoint stores), so it is always on a grid the checkpoint holds exactly. Moving the codes (AutoRound's
rounding offsets, straight through the rounding) was measured worse: GPTQ's codes are already chosen with the
error fed forward (docs/reconstruction.md).

The target ``y`` is the dense model's output of this block on the dense stream (``dense``: the block also
corrects the error it inherits) or the dense block on the compressed stream (``compressed``: one stream).
``sublayer`` trains the first group of linears (the attention) on that module's own output first, then the
rest on the block's output.

The result is kept only when it lowers the block's loss on the calibration windows; otherwise the solved
weights are put back and the report says so. Pure tensor code: the engine supplies ``run(b)``, a forward of
batch ``b`` through the block.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmprune.quant import QuantParams, codes, stored_scale

log = logging.getLogger(__name__)

TARGETS = ("dense", "compressed")
GRANULARITIES = ("block", "sublayer")


@dataclass(frozen=True)
class ReconstructSpec:
    """What the reconstruction stage needs, resolved once from the recipe."""

    steps: int  # optimizer steps per block (each on one batch of calibration windows)
    lr: float  # Adam's learning rate on unquantized weights (absolute units; weights are O(1e-2))
    target: str = "dense"  # dense: the dense model's stream; compressed: the dense block on this stream
    granularity: str = "block"  # block: all at once; sublayer: attention on its output, then the rest
    norms: bool = False  # also train norm weights and the linears' biases
    seed: int = 0  # the order the batches are visited in
    scale_lr: float = 5e-3  # Adam's rate on quantized weights' log-scales (relative: 5e-3 = 0.5% a step)


@dataclass
class Trainable:
    """One tensor the reconstruction trains, and what keeps it valid."""

    name: str
    param: nn.Parameter  # the leaf the block's forward reads
    mask: Tensor | None  # True where the weight may be nonzero (param's layout); None: dense
    grid: QuantParams | None  # the grid it stays on (codes fixed, scales trained); None: not quantized
    transposed: bool  # param stored (in, out) (GPT-2's Conv1D); grids are (out, in)

    def rows_cols(self, w: Tensor) -> Tensor:
        """``w`` (param's layout) as (out, in), the layout of masks' rows and grids."""
        return w.t() if self.transposed else w

    def finish(self, W: Tensor) -> None:
        """Write ``W`` ((out, in), fp32) into the param: zero where pruned, in the param's dtype."""
        w = W.t() if self.transposed else W
        if self.mask is not None:
            w = w * self.mask
        self.param.data.copy_(w.to(self.param.dtype))


def trainables(linears: dict[str, nn.Module], grids: dict[str, QuantParams], masked: bool, block: nn.Module,
               norms: bool) -> list[Trainable]:
    """The compressed linears' weights (``grids`` by name in the block), and with ``norms`` the block's norm
    weights and the linears' biases. ``masked``: zeros are pruned weights and stay zero."""
    out = []
    for name, mod in linears.items():
        p = mod.weight
        out.append(Trainable(name, p, (p.detach() != 0) if masked else None, grids.get(name),
                             not isinstance(mod, nn.Linear)))
        if norms and getattr(mod, "bias", None) is not None:
            out.append(Trainable(f"{name}.bias", mod.bias, None, None, False))
    if norms:
        out += [Trainable(n, p, None, None, False) for n, p in block.named_parameters()
                if p.dim() == 1 and "norm" in n.lower()]
    return out


@contextlib.contextmanager
def _trainable(block: nn.Module, params: list[Trainable]) -> Iterator[None]:
    """Only ``params`` require grad for the duration (the block's others and the views' owners do not)."""
    before = {id(p): p.requires_grad for p in block.parameters()}
    before.update({id(t.param): t.param.requires_grad for t in params})
    for p in block.parameters():
        p.requires_grad_(False)
    for t in params:
        t.param.requires_grad_(True)
    try:
        yield
    finally:
        for p in block.parameters():
            p.requires_grad_(before[id(p)])
            p.grad = None
        for t in params:
            t.param.requires_grad_(before[id(t.param)])
            t.param.grad = None


def _rel(out: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(‖out − target‖², ‖target‖²) in fp32."""
    t = target.to(out.device).float()
    return (out.float() - t).pow(2).sum(), t.pow(2).sum()


def loss_of(outputs: list[Tensor], targets: list[Tensor], reduce: Callable[[list[float]], list[float]]) -> float:
    """The relative squared error Σ‖o − t‖² / Σ‖t‖² over every batch (and rank)."""
    num = den = 0.0
    for o, t in zip(outputs, targets, strict=True):
        a, b = _rel(o, t)
        num, den = num + float(a), den + float(b)
    num, den = reduce([num, den])
    return num / den if den else 0.0


class _Dense:
    """An unquantized tensor: Adam on an fp32 master at the spec's learning rate."""

    def __init__(self, t: Trainable, lr: float):
        self.t = t
        self.master = t.rows_cols(t.param.detach()).float().clone()
        self.groups = [{"params": [self.master], "lr": lr}]

    def backward(self, g: Tensor) -> None:
        self.master.grad = g if self.t.mask is None else g * self.t.rows_cols(self.t.mask)

    def weight(self) -> Tensor:
        return self.master


class _Quantized:
    """A weight on a grid, trained as its grid's scales: one log-offset per (row, group), the codes fixed, so
    the weight is always ``(code − zero) · scale`` with the scale rounded to what the checkpoint stores for
    the grid (quant.stored_scale): on a grid the checkpoint holds exactly."""

    def __init__(self, t: Trainable, scale_lr: float):
        self.t = t
        self.grid = t.grid.to(t.param.device)
        W = t.rows_cols(t.param.detach())
        self.rows, self.cols = W.shape
        self.gcols = self.grid.spec.group_cols(self.cols)
        self.codes = codes(W, self.grid).float()
        self.zero = self.grid.columns(self.cols)[1]
        self.scale0 = self.grid.scale.detach().float()
        self.log_scale = torch.zeros_like(self.scale0)
        self.groups = [{"params": [self.log_scale], "lr": scale_lr}]

    def scale(self) -> Tensor:
        """The scales as the checkpoint will store them, as fp32 (rows, groups)."""
        return stored_scale(self.scale0 * self.log_scale.exp(), self.grid)

    def weight(self) -> Tensor:
        return (self.codes - self.zero) * self.scale().repeat_interleave(self.gcols, dim=1)

    def backward(self, g: Tensor) -> None:
        self.log_scale.grad = (g * self.weight()).reshape(self.rows, -1, self.gcols).sum(-1)  # dW/d log s = W

    def commit(self) -> None:
        """The trained scales into the grid (the checkpoint writer reads them there)."""
        self.t.grid.scale.copy_(self.scale().to(self.t.grid.scale.dtype))


def train(run: Callable[[int], Tensor], targets: list[Tensor], params: list[Trainable], steps: int,
          spec: ReconstructSpec, reduce: Callable[[list[float]], list[float]],
          reduce_grads: Callable[[list[Tensor]], None]) -> list[float]:
    """``steps`` Adam steps of the relative error of ``run(b)`` against ``targets[b]``, one batch per step in
    a seeded order; returns the losses seen. The params end projected (on grid, masked), and quantized
    weights' grids hold their trained scales.

    Under torchrun each rank runs its own batch b: the error is divided by the target's norm over every
    rank's batch and the gradients summed, which is the gradient of one process holding all those windows."""
    masters = [_Dense(t, spec.lr) if t.grid is None else _Quantized(t, spec.scale_lr)
               for t in params]
    opt = torch.optim.Adam([g for m in masters for g in m.groups])
    gen = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(targets), generator=gen).tolist()
        b = order.pop()
        with torch.enable_grad():
            err, norm = _rel(run(b), targets[b])
            loss = err / max(reduce([float(norm)])[0], 1e-30)
            loss.backward()
        losses.append(reduce([float(loss)])[0])
        grads = [t.param.grad.float() if t.param.grad is not None else torch.zeros_like(t.param, dtype=torch.float)
                 for t in params]
        reduce_grads(grads)
        for t, m, g in zip(params, masters, grads, strict=True):
            m.backward(t.rows_cols(g))
            t.param.grad = None
        opt.step()
        with torch.no_grad():
            for t, m in zip(params, masters, strict=True):
                t.finish(m.weight())
    with torch.no_grad():
        for m in masters:
            if isinstance(m, _Quantized):
                m.commit()
    return losses


class _Capture:
    """The output of one module during a forward; with ``stop``, the forward is cut short right after it."""

    class Stop(Exception):
        pass

    def __init__(self, module: nn.Module, stop: bool):
        self.out: Tensor | None = None
        self.stop = stop
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, args: tuple, out: object) -> None:
        self.out = out[0] if isinstance(out, tuple) else out
        if self.stop:
            raise _Capture.Stop

    def close(self) -> None:
        self.handle.remove()


def module_outputs(module: nn.Module, forward: Callable[[], object]) -> Tensor:
    """``module``'s output in one call of ``forward`` (the rest of the forward still runs)."""
    cap = _Capture(module, stop=False)
    try:
        forward()
    finally:
        cap.close()
    return cap.out


def split_first_group(block: nn.Module, names: list[str]) -> tuple[str | None, list[str], list[str]]:
    """For ``sublayer``: the block's first child holding trained linears (the attention in every family) and
    the names inside it and after it. (None, [], names) when every linear is under one child."""
    heads = list(dict.fromkeys(n.split(".")[0] for n in names))
    if len(heads) < 2:
        return None, [], names
    first = heads[0]
    inside = [n for n in names if n.split(".")[0] == first]
    return first, inside, [n for n in names if n.split(".")[0] != first]


def reconstruct_block(
    block: nn.Module, run: Callable[[int], Tensor], n_batches: int, targets: list[Tensor],
    before: list[Tensor], params: list[Trainable], spec: ReconstructSpec,
    mid_targets: list[Tensor] | None = None,
    reduce: Callable[[list[float]], list[float]] = lambda v: v,
    reduce_grads: Callable[[list[Tensor]], None] = lambda g: None,
) -> tuple[list[Tensor], dict]:
    """Train ``params`` so the block's outputs approach ``targets``; return the outputs (batch by batch, as
    ``run`` gives them, on the targets' device) and the block's report entry.

    ``before``: the block's outputs as solved (for the loss before); ``mid_targets``: with ``sublayer``, the
    first group's module outputs to train it on. The solved weights are restored when training did not lower
    the loss."""
    t0 = time.perf_counter()
    saved = [t.param.detach().clone() for t in params]
    saved_scales = [t.grid.scale.clone() if t.grid is not None else None for t in params]
    loss_before = loss_of(before, targets, reduce)
    seen: list[float] = []
    with _trainable(block, params):
        phases: list[tuple[list[Trainable], Callable[[int], Tensor], list[Tensor], int]] = []
        first, inside, _ = (split_first_group(block, [t.name for t in params])
                            if spec.granularity == "sublayer" else (None, [], []))
        if first is not None and mid_targets is not None:
            sub = block.get_submodule(first)

            def run_first(b: int) -> Tensor:
                cap = _Capture(sub, stop=True)
                try:
                    with contextlib.suppress(_Capture.Stop):
                        run(b)
                finally:
                    cap.close()
                return cap.out

            own = {n for n in inside} | {f"{n}.bias" for n in inside}
            head = [t for t in params if t.name in own or t.name.startswith(first + ".")]
            rest = [t for t in params if t not in head]
            half = math.ceil(spec.steps / 2)
            phases = [(head, run_first, mid_targets, half), (rest, run, targets, spec.steps - half)]
        else:
            phases = [(params, run, targets, spec.steps)]
        for group, fn, tgt, steps in phases:
            if group and steps:
                seen += train(fn, tgt, group, steps, spec, reduce, reduce_grads)
    with torch.no_grad():
        after = [run(b).to(targets[b].device) for b in range(n_batches)]
    loss_after = loss_of(after, targets, reduce)
    reverted = not loss_after < loss_before
    if reverted:
        with torch.no_grad():
            for t, w, sc in zip(params, saved, saved_scales, strict=True):
                t.param.data.copy_(w)
                if sc is not None:
                    t.grid.scale.copy_(sc)
        after = before
        log.info("reconstruction did not lower the block's loss (%.4g -> %.4g): the solved weights are kept",
                 loss_before, loss_after)
    return after, {
        "steps": len(seen),
        "loss_before": loss_before,
        "loss_after": loss_before if reverted else loss_after,
        "trained_loss": loss_after,  # what training reached, kept or not
        "reverted": reverted,
        "trained": len(params),
        "seconds": round(time.perf_counter() - t0, 3),
    }
