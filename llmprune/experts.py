"""Mixture-of-experts layers seen as ordinary linears: each expert's matrices as (rows, cols) views of the
fused 3-D parameters, and a routed forward that calls them, so hooks, Hessians and solvers work unchanged.

transformers 5 stores a layer's experts fused: ``gate_up_proj`` (experts, 2·inter, hidden) and ``down_proj``
(experts, hidden, inter), or transposed (experts, in, out) as gpt-oss does, gate and up concatenated or
interleaved, with or without biases. Its ``use_experts_implementation`` decorator records that layout on the
module (``has_gate``, ``is_concatenated``, ``is_transposed``, ``has_bias``) and gives it ``_apply_gate``;
those attributes are all this module reads, so no family needs code of its own. The views share storage
with the fused parameters: a solver's write to a view is a write to the checkpoint's tensor, and the output
keeps the input's layout.

While ``routed(...)`` is active, each experts module runs every expert that the model's own router picked
through its views, on exactly the tokens routed to it: a forward hook on a view sees those tokens only, so
its Hessian is the expert's. Nothing else about the model changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from llmprune import distributed
from llmprune.arch import ROUTERS, is_fused_experts

log = logging.getLogger(__name__)

LAYOUT_ATTRS = ("has_gate", "is_concatenated", "is_transposed", "has_bias")


class ExpertLinear(nn.Linear):
    """One expert's matrix as an nn.Linear whose weight (and bias) are views of the fused parameters."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)  # shares storage with the fused tensor
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None


def find_experts(block: nn.Module) -> dict[str, nn.Module]:
    """Name in block -> fused experts module."""
    return {name: mod for name, mod in block.named_modules() if is_fused_experts(mod)}


def supported(module: nn.Module) -> bool:
    """Whether the module records its layout (transformers 5's experts decorator); others are left dense."""
    return all(hasattr(module, a) for a in LAYOUT_ATTRS)


def num_experts(module: nn.Module) -> int:
    return module.down_proj.shape[0]


def _matrix(param: Tensor, e: int, transposed: bool) -> Tensor:
    """Expert ``e``'s matrix as (out, in), a view of ``param``'s storage."""
    w = param.data[e]
    return w.t() if transposed else w


def views(module: nn.Module) -> dict[str, ExpertLinear]:
    """``{e}.gate_proj`` / ``{e}.up_proj`` / ``{e}.down_proj`` -> view, for every expert of a fused module.

    Gate and up are separate views (rows 0..I and I..2I when concatenated, even and odd rows when
    interleaved), as per-expert checkpoints store them, so each has exactly the requested sparsity.
    """
    t = module.is_transposed
    bias = module.has_bias
    out: dict[str, ExpertLinear] = {}
    for e in range(num_experts(module)):
        if module.has_gate:
            gu = _matrix(module.gate_up_proj, e, t)
            gub = module.gate_up_proj_bias.data[e] if bias else None
            half = gu.shape[0] // 2
            rows = ((slice(0, half), slice(half, None)) if module.is_concatenated
                    else (slice(0, None, 2), slice(1, None, 2)))
            for name, r in zip(("gate_proj", "up_proj"), rows, strict=True):
                out[f"{e}.{name}"] = ExpertLinear(gu[r], gub[r] if gub is not None else None)
        else:
            out[f"{e}.up_proj"] = ExpertLinear(_matrix(module.up_proj, e, t),
                                               module.up_proj_bias.data[e] if bias else None)
        out[f"{e}.down_proj"] = ExpertLinear(_matrix(module.down_proj, e, t),
                                             module.down_proj_bias.data[e] if bias else None)
    return out


def block_views(block: nn.Module) -> dict[str, ExpertLinear]:
    """Every supported fused expert matrix of a block, by name in the block (``mlp.experts.3.down_proj``)."""
    return {f"{path}.{k}": v for path, mod in find_experts(block).items() if supported(mod)
            for k, v in views(mod).items()}


def unsupported(block: nn.Module) -> list[str]:
    """Fused experts modules whose layout is not recorded: their weights cannot be solved, only listed."""
    return [path for path, mod in find_experts(block).items() if not supported(mod)]


def _routing(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden (tokens, d), top-k expert indices (tokens, k), their weights) from an experts module's call."""
    rest = list(args[1:]) + [v for v in kwargs.values() if isinstance(v, Tensor)]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    index, weights = rest[0], rest[1]
    if index.is_floating_point():  # called as (hidden, weights, index)
        index, weights = weights, index
    return hidden, index, weights


class Routed:
    """The routed forward of one fused experts module, through its views; also the REAP scores.

    ``scores[e]`` accumulates Σ over the tokens routed to expert e of (routing weight × ‖expert output‖),
    ``tokens[e]`` their count: REAP's saliency of an expert is their ratio.
    """

    def __init__(self, module: nn.Module, linears: dict[str, nn.Module]):
        self.module = module
        self.linears = linears  # "{e}.gate_proj" ... -> module to call (a view, or what replaced it)
        n = num_experts(module)
        self.scores = torch.zeros(n, dtype=torch.float64)
        self.tokens = torch.zeros(n, dtype=torch.long)

    def __call__(self, *args, **kwargs) -> Tensor:
        m = self.module
        hidden, index, weights = _routing(args, dict(kwargs))
        out = torch.zeros_like(hidden)
        n = num_experts(m)
        for e in torch.unique(index).tolist():
            if e >= n:  # expert-parallel sentinel: not on this rank
                continue
            tok, pos = torch.where(index == e)
            x = hidden[tok]
            if m.has_gate:
                g, u = self.linears[f"{e}.gate_proj"](x), self.linears[f"{e}.up_proj"](x)
                gu = torch.cat((g, u), -1) if m.is_concatenated else torch.stack((g, u), -1).flatten(-2)
                h = m._apply_gate(gu)
            else:
                h = m.act_fn(self.linears[f"{e}.up_proj"](x))
            y = self.linears[f"{e}.down_proj"](h)
            if getattr(m, "has_post_expert_norm", False):
                y = m.post_expert_norm(y)
            w = weights[tok, pos, None]
            self.scores[e] += float((w.detach().float() * y.detach().float().norm(dim=-1, keepdim=True)).sum())
            self.tokens[e] += tok.numel()
            out.index_add_(0, tok, (y * w).to(out.dtype))
        return out


@contextlib.contextmanager
def routed(block: nn.Module, linears: dict[str, nn.Module]) -> Iterator[dict[str, Routed]]:
    """While active, every supported fused experts module of ``block`` runs through ``linears`` (names in the
    block, as ``block_views`` gives them). Yields experts path -> its ``Routed`` (token counts, REAP scores)."""
    active: dict[str, Routed] = {}
    for path, mod in find_experts(block).items():
        if not supported(mod):
            continue
        prefix = f"{path}."
        own = {k.removeprefix(prefix): v for k, v in linears.items() if k.startswith(prefix)}
        missing = [k for k in views(mod) if k not in own]  # e.g. skipped: called as the model stores it
        if missing:
            fresh = views(mod)
            own.update({k: fresh[k] for k in missing})
        active[path] = Routed(mod, own)
        mod.forward = active[path]  # an instance attribute: nn.Module.__call__ (and its hooks) call it
    try:
        yield active
    finally:
        for path in active:
            del find_experts(block)[path].forward


def expert_of(name: str) -> tuple[str, int] | None:
    """(experts path, expert index) for a view name such as ``mlp.experts.3.down_proj``, else None."""
    head, _, leaf = name.rpartition(".")
    path, _, idx = head.rpartition(".")
    if leaf in ("gate_proj", "up_proj", "down_proj") and idx.isdigit() and path.endswith("experts"):
        return path, int(idx)
    return None


def drop(module: nn.Module, router: nn.Module, keep: list[int]) -> None:
    """Keep only experts ``keep`` (sorted) of a fused module and the router rows that pick them."""
    idx = torch.tensor(keep, dtype=torch.long, device=module.down_proj.device)
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() >= 2 or name.endswith("_bias"):
            setattr(module, name, nn.Parameter(p.data.index_select(0, idx).clone(), requires_grad=False))
    for name, p in list(router.named_parameters(recurse=False)):
        setattr(router, name, nn.Parameter(p.data.index_select(0, idx.to(p.device)).clone(), requires_grad=False))
    _set_counts((module, router), len(keep))


def find_router(block: nn.Module, experts_path: str) -> nn.Module | None:
    """The module that routes tokens to ``experts_path``: a sibling named in ``arch.ROUTERS`` whose weight has
    one row per expert."""
    return find_router_by_rows(block, experts_path, num_experts(block.get_submodule(experts_path)))


def router_names(block: nn.Module) -> list[str]:
    """Names in the block of the routers of its fused experts modules."""
    out = []
    for path in find_experts(block):
        router = find_router(block, path)
        if router is not None:
            out += [n for n, m in block.named_modules() if m is router]
    return out


def kept_count(config, fraction: float) -> tuple[str, int, int] | None:
    """(config key of the expert count, experts now, experts kept) for ``--drop-experts fraction``; None for
    a config without experts. The count is per model, so every MoE layer drops the same number."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return key, n, n - round(fraction * n)
    return None


def reap_drop(block: nn.Module, run, keep: int) -> dict[str, dict]:
    """Score every expert of the block by REAP (mean over its routed tokens of routing weight x output norm,
    from one call of ``run``, which runs the block over the calibration data), keep the ``keep`` best of each
    fused module, drop the rest and their router rows. Returns experts path -> {"dropped", "scores"}."""
    with routed(block, block_views(block)) as active:
        run()
    out = {}
    for path, r in active.items():
        module = r.module
        router = find_router(block, path)
        if router is None:
            raise ValueError(f"{path}: no router found beside it to drop expert rows from")
        # torchrun: every rank's tokens, so all ranks keep the same experts
        scores = torch.tensor(distributed.all_sum(r.scores.tolist()), dtype=torch.float64)
        tokens = torch.tensor(distributed.all_sum(r.tokens.double().tolist()), dtype=torch.float64)
        saliency = scores / tokens.clamp(min=1)
        order = sorted(range(len(saliency)), key=lambda e: float(saliency[e]), reverse=True)
        kept = sorted(order[:keep])
        drop(module, router, kept)
        out[path] = {"dropped": sorted(order[keep:]), "scores": [round(float(s), 6) for s in saliency]}
    return out


def sync_counts(block: nn.Module) -> None:
    """After loading tensors with fewer experts than the skeleton (a block already dropped by ``reap_drop``
    and read back on resume), make the modules' expert counts follow their tensors."""
    for path, module in find_experts(block).items():
        n = module.down_proj.shape[0]
        _set_counts((module, find_router_by_rows(block, path, n)), n)


def _set_counts(owners: tuple, n: int) -> None:
    """The expert count an experts module and its router keep as attributes (the forwards read them)."""
    for owner in owners:
        for attr in ("num_experts", "num_local_experts", "out_features"):
            if owner is not None and hasattr(owner, attr):
                setattr(owner, attr, n)


def find_router_by_rows(block: nn.Module, experts_path: str, n: int) -> nn.Module | None:
    """A sibling of ``experts_path`` named in ``arch.ROUTERS`` whose weight has ``n`` rows."""
    parent_path = experts_path.rpartition(".")[0]
    parent = block.get_submodule(parent_path) if parent_path else block
    for name in ROUTERS:
        w = getattr(getattr(parent, name, None), "weight", None)
        if isinstance(w, Tensor) and w.dim() == 2 and w.shape[0] == n:
            return getattr(parent, name)
    return None
