"""Data-parallel runs under ``torchrun``: each rank streams its share of the calibration windows, Hessians are
summed over the ranks, every rank ends each block with the same weights, and rank 0 alone writes.

Built on torch.distributed (NCCL on CUDA, gloo on CPU), started from torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); nothing here starts or watches processes. Without that
environment every function is the single-process identity, so the rest of the code calls them freely.

Equal results: a Hessian is the token-weighted mean of the ranks' means (summed in float64), which equals the
single-process one up to summation order; linears are solved on one rank each (two-pass blocks, assigned by
estimated cost) or on every rank alike (sequential blocks, where each solve gates the next group), and the
block's new weights are broadcast from where they were solved, so every rank propagates the same block.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_STATE: dict = {}


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str | None = None) -> bool:
    """Join torchrun's process group (once); False when not launched by torchrun with several processes.

    The timeout (LLMPRUNE_DIST_TIMEOUT seconds, default 900) bounds how long the others wait for a rank that
    died or raised, after which they fail too (torchrun also stops the group when one worker exits)."""
    import torch.distributed as dist

    if env_world() <= 1:
        return False
    if dist.is_initialized():
        return True
    cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda:
        torch.cuda.set_device(_local_device())
    timeout = datetime.timedelta(seconds=float(os.environ.get("LLMPRUNE_DIST_TIMEOUT", "900")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _STATE["cuda"] = cuda
    # block weights broadcast from rank 0 (lazy.BlockSource with read_on_main) travel on their own group: the
    # prefetch thread sends block i+1 while the main thread all-reduces block i's Hessians. A gloo group, on
    # host tensors: two NCCL communicators driven from two threads share the device's default stream and can
    # wait on each other in a different order on each rank (a hang); the block is on the host anyway
    _STATE["read_group"] = dist.new_group(backend="gloo")
    log.info("torchrun: rank %d of %d (%s)", rank(), world(), "nccl" if cuda else "gloo")
    return True


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    """This rank's CUDA device under torchrun (LOCAL_RANK), else None (the recipe's choice stands)."""
    if active() and _STATE.get("cuda"):
        return torch.device("cuda", _local_device())
    return None


def _local_device() -> int:
    """LOCAL_RANK's GPU; modulo the visible count, for launchers that show each rank only its own GPU."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def shard(windows: Tensor) -> Tensor:
    """This rank's windows: every world-th, from its rank (all of them when alone)."""
    return windows[rank()::world()] if active() else windows


def _comm(t: Tensor) -> Tensor:
    """A tensor the backend can carry: on this rank's GPU for NCCL, contiguous."""
    dev = device() or torch.device("cpu")
    return t.detach().to(dev).contiguous()


def sum_mean(H: Tensor | None, n: int, shape: tuple[int, ...], like: torch.device) -> tuple[Tensor, int]:
    """The all-ranks mean of running means ``H`` over ``n`` tokens each (H None: this rank saw none), in fp32
    for the solvers. The ranks' means are summed in fp64; fp64 accumulators (``--hessian-dtype fp64``)
    enter unrounded, so the result is rounded to fp32 once, like the single process's (equal to it in every
    case measured, not by construction: the fp64 sums round in another order)."""
    import torch.distributed as dist

    if not active():
        return (H.float() if H is not None else H), n  # an fp64 accumulator rounded once
    total = H.double() * n if H is not None and n else torch.zeros(shape, dtype=torch.float64)
    total = _comm(total)
    count = _comm(torch.tensor([float(n)], dtype=torch.float64))
    dist.all_reduce(total)
    dist.all_reduce(count)
    n_all = int(count.item())
    return ((total / n_all).float() if n_all else total.float()).to(like), n_all


def broadcast_(t: Tensor, src: int) -> None:
    """Overwrite ``t`` (any layout, e.g. a view of a fused tensor) with rank ``src``'s values, in place."""
    import torch.distributed as dist

    if not active():
        return
    buf = _comm(t)
    dist.broadcast(buf, src)
    t.copy_(buf.to(t.device))


def broadcast_tensors(named: dict[str, Tensor] | None, src: int = 0) -> dict[str, Tensor]:
    """Rank ``src``'s named tensors on every rank, on the host (the other ranks pass None): how a block read
    by rank 0 alone reaches the others. Names, shapes and dtypes go first, then one broadcast per tensor."""
    import torch.distributed as dist

    if not active():
        return named or {}
    group = _STATE.get("read_group")  # gloo: host tensors, sent as their bytes (any dtype)
    box = [[(k, tuple(t.shape), t.dtype) for k, t in named.items()] if rank() == src else None]
    dist.broadcast_object_list(box, src, group=group)
    out = {}
    for key, shape, dtype in box[0]:
        buf = named[key].detach().cpu().contiguous() if rank() == src else torch.empty(shape, dtype=dtype)
        dist.broadcast(buf.reshape(-1).view(torch.uint8), src, group=group)
        out[key] = named[key] if rank() == src else buf
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order (a one-element list when alone)."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float]) -> list[float]:
    """Elementwise sum over the ranks, in float64."""
    import torch.distributed as dist

    if not active():
        return values
    t = _comm(torch.tensor(values, dtype=torch.float64))
    dist.all_reduce(t)
    return t.cpu().tolist()


def sum_(tensors: list[Tensor]) -> None:
    """Replace each tensor by its sum over the ranks, in place (one all-reduce for the lot)."""
    import torch.distributed as dist

    if not active() or not tensors:
        return
    flat = _comm(torch.cat([t.reshape(-1).float() for t in tensors]))
    dist.all_reduce(flat)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t).to(t.device))
        off += n


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def assign(costs: dict[str, float]) -> dict[str, int]:
    """Each item to a rank, largest first onto the least loaded (LPT), so the ranks finish together."""
    load = [0.0] * world()
    out = {}
    for name, c in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(len(load)), key=lambda i: load[i])
        out[name] = r
        load[r] += c
    return out


def shutdown() -> None:
    """Leave the process group (at the end of a torchrun run), after the others are done with it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            read = _STATE.pop("read_group", None)
            if read is not None:  # the subgroup first: its gloo threads once outlived the default group's teardown
                dist.destroy_process_group(read)
            dist.destroy_process_group()
