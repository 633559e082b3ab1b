"""What a solver compresses in a block: its linears (routers excepted) and every expert's matrices, made
ready on the block's device with its experts routed through them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from llmprune import experts
from llmprune.arch import find_linears, find_routers


def block_targets(block: nn.Module) -> dict[str, nn.Module]:
    """What a solver compresses in a block: its linears (routers excepted) and, in a mixture of experts, every
    expert's matrices as views of the fused parameters (experts.py). Views are made anew from the block's
    current tensors, so call it after the block is loaded onto its device."""
    routers = set(find_routers(block))
    out = {n: m for n, m in find_linears(block).items() if n not in routers}
    out.update(experts.block_views(block))
    return out


@contextlib.contextmanager
def on_device(block: nn.Module, chosen: dict[str, nn.Module]) -> Iterator[dict[str, nn.Module]]:
    """The chosen linears of a block now on its device (expert views made from its current tensors), with its
    experts routed through them (experts.routed) for the duration."""
    current = block_targets(block)
    lin = {n: current[n] for n in chosen if n in current}  # not in current: an expert dropped (--drop-experts)
    with experts.routed(block, lin):
        yield lin
