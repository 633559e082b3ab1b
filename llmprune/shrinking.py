"""Structured pruning: fewer MLP channels, attention heads and blocks; a smaller model of the same family.

One streamed pass (the engine's): per block, the Hessians of the linears that read the removable groups
(down_proj / fc2 for channels, o_proj for heads) and the block's input/output cosine similarity; then the
groups go (solvers/group_obs.py: OBS with the consumer's update, or l1 / wanda scores), the producing rows
(gate/up, fc1; q, and k/v with whole KV groups) and the consuming columns are cut out, the modules are
replaced by smaller ones, and the shrunk block feeds the next. At the end the blocks that change their input
least (1 − cosine) are dropped. When heads and channels both go, the heads go first and down_proj's
Hessian comes from a second pass over the block with them gone. The config says the new sizes, so
transformers loads the result with no custom code. Widths are the same in every block (the standard config
has one of each) and channel counts are rounded to a multiple of ``align``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from llmprune import distributed, experts
from llmprune.arch import LAYOUTS, Layout, find_blocks, get_weight
from llmprune.block import dense_outputs_of_original, reconstruct_trained, reconstruction_targets, shared_hessians
from llmprune.calibration import calibration_set
from llmprune.compression import RunSpec, experts_kept, reconstruction_summary
from llmprune.data import batched
from llmprune.engine import BlockPass, Stream, resolve_device
from llmprune.errors import UsageError
from llmprune.hessian import HessianCollector
from llmprune.progress import Progress
from llmprune.solvers.group_obs import METHODS, channel_chunk, obs_remove, score_remove
from llmprune.solvers.result import relative_error
from llmprune.targets import block_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShrinkSpec:
    mlp: float = 0.0  # fraction of each block's MLP channels removed
    heads: float = 0.0  # fraction of each block's attention heads removed
    drop_blocks: int = 0  # whole blocks removed
    method: str = "obs"  # obs (second order, with the consumer's update), l1, wanda
    align: int = 64  # kept MLP channels rounded to a multiple of this (GEMM widths that run fast)
    drop_experts: float = 0.0  # mixture of experts: fraction of each MoE layer's experts removed (REAP)


@dataclass(frozen=True)
class Plan:
    layout: Layout | None  # None: a mixture of experts, where only experts and blocks go
    channels: int  # MLP channels before
    keep_channels: int
    heads: int
    kv_heads: int
    head_dim: int
    remove_per_group: int  # query heads removed from every KV group (GQA), or
    whole_groups: int  # whole heads (with their k/v) removed (one query head per KV head)
    experts: tuple[str, int, int] | None = None  # --drop-experts: (config key, experts now, experts kept)


def _fraction(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0):
        raise UsageError(f"--{name} {value} is outside [0, 1): pass e.g. --{name} 0.25")


def plan(model: nn.Module, spec: ShrinkSpec) -> Plan:
    """What the spec removes from this model, checked before any work (one-line errors)."""
    _fraction("mlp", spec.mlp)
    _fraction("heads", spec.heads)
    if spec.method not in METHODS:
        raise UsageError(f"unknown shrink method {spec.method!r}: choose {', '.join(METHODS)}")
    if spec.align < 1:
        raise UsageError(f"--align {spec.align} must be a positive number of channels (1 = no rounding)")
    config = model.config
    _, blocks = find_blocks(model)
    if not (0.0 <= spec.drop_experts < 1.0):
        raise UsageError(f"--drop-experts {spec.drop_experts} is outside [0, 1): pass e.g. --drop-experts 0.25")
    if any(experts.find_experts(b) for b in blocks):
        if spec.mlp or spec.heads:
            raise UsageError(f"{config.model_type} is a mixture of experts: shrink removes its experts"
                             " (--drop-experts) and blocks (--drop-blocks); drop --mlp and --heads")
        if not (0 <= spec.drop_blocks < len(blocks)):
            raise UsageError(f"--drop-blocks {spec.drop_blocks}: the model has {len(blocks)} blocks; drop fewer")
        kept = experts_kept(model, spec.drop_experts) if spec.drop_experts else None
        return Plan(None, 0, 0, 0, 0, 0, 0, 0, kept)
    if spec.drop_experts:
        raise UsageError("--drop-experts removes experts of a mixture-of-experts model; this one has none:"
                         " drop the option")
    layout = LAYOUTS.get(config.model_type)
    if layout is None:
        raise UsageError(f"llmprune shrink does not know where {config.model_type} keeps its MLP channels and"
                         f" heads: supported: {', '.join(sorted(LAYOUTS))}")
    if not (0 <= spec.drop_blocks < len(blocks)):
        raise UsageError(f"--drop-blocks {spec.drop_blocks}: the model has {len(blocks)} blocks; drop fewer")
    channels = get_weight(blocks[0].get_submodule(layout.mlp_out)).shape[1]
    keep = channels
    if spec.mlp > 0:
        target = channels * (1 - spec.mlp)
        keep = round(target / spec.align) * spec.align if spec.align > 1 else round(target)
        keep = min(keep, channels)
        if keep <= 0:
            raise UsageError(f"--mlp {spec.mlp} leaves no MLP channel of {channels} (with --align {spec.align}):"
                             " remove less or lower --align")
    heads = getattr(config, "num_attention_heads", 0) or 0
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = 0
    per_group = whole = 0
    if spec.heads > 0:
        if layout.q is None:
            raise UsageError(f"{config.model_type} derives its head size from the hidden size, so heads cannot be"
                             " removed without changing it: use --mlp and --drop-blocks only")
        head_dim = get_weight(blocks[0].get_submodule(layout.q)).shape[0] // heads
        group = heads // kv
        if group > 1:  # GQA: the same number of query heads from every KV group keeps the config valid
            per_group = round(spec.heads * group)
            if per_group >= group:
                raise UsageError(f"--heads {spec.heads} removes every query head of a KV group ({group} each):"
                                 " remove less")
        else:
            whole = round(spec.heads * heads)
            if whole >= heads:
                raise UsageError(f"--heads {spec.heads} leaves no attention head of {heads}: remove less")
    return Plan(layout, channels, keep, heads, kv, head_dim, per_group, whole)


def _replace(block: nn.Module, name: str, W: Tensor, bias: Tensor | None) -> None:
    """Put a linear of the new shape (W as (out, in)) in place of ``name``, same kind, dtype and device."""
    old = block.get_submodule(name)
    owner_name, _, leaf = name.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    dtype, device = old.weight.dtype, old.weight.device
    if isinstance(old, nn.Linear):
        new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=dtype, device=device)
        new.weight.data.copy_(W)
    else:  # transformers' Conv1D (GPT-2): weight stored (in, out)
        new = type(old)(W.shape[0], W.shape[1]).to(dtype=dtype, device=device)
        new.weight.data.copy_(W.t())
    if bias is not None:
        new.bias.data.copy_(bias)
    new.requires_grad_(False)
    setattr(owner, leaf, new)


def _bias(mod: nn.Module) -> Tensor | None:
    return mod.bias.data if getattr(mod, "bias", None) is not None else None


def _remove_groups(W: Tensor, H: Tensor, groups: Tensor, n: int, spec: ShrinkSpec, damp_frac: float,
                   producers: list[Tensor], allowed=None, chunk: int = 1) -> tuple[Tensor, Tensor, float | None]:
    """(removed group indices, the consumer's new full-width weight (removed columns zero), relative error)."""
    if spec.method == "obs":
        removed, W_new = obs_remove(W, H, groups, n, damp_frac=damp_frac, chunk=chunk, allowed=allowed)
    else:
        removed = score_remove(W, H, producers, groups, n, spec.method, allowed)
        W_new = W.float().clone()
        W_new[:, groups[removed].reshape(-1)] = 0
    return removed, W_new, relative_error(W, W_new, H) if H is not None else None


def _keep(n: int, removed: Tensor) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=removed.device)
    mask[removed] = False
    return mask


def _head_columns(p: Plan, device: torch.device) -> Tensor:
    """(heads, head_dim): the columns of o (rows of q) each head owns."""
    return torch.arange(p.heads * p.head_dim, device=device).view(p.heads, p.head_dim)


def _cut_heads(block: nn.Module, p: Plan, removed: Tensor, W_o: Tensor) -> None:
    """Remove heads ``removed``: their columns of o (``W_o``: o's new full-width weight), their rows of q (and of
    k and v when whole KV groups go), and the attention's query-per-KV-group count. On a weightless (meta)
    block this gives it the shrunk shapes only."""
    lay = p.layout
    keep_heads = _keep(p.heads, removed)
    cols = _head_columns(p, removed.device)[keep_heads].reshape(-1)
    o = block.get_submodule(lay.o)
    _replace(block, lay.o, W_o[:, cols].to(get_weight(o).dtype), _bias(o))
    for name in (lay.q, *((lay.k, lay.v) if p.whole_groups else ())):  # one query head per KV head: k, v go too
        mod = block.get_submodule(name)
        _replace(block, name, get_weight(mod)[cols], None if _bias(mod) is None else _bias(mod)[cols])
    attn = block.get_submodule(lay.attn)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = int(keep_heads.sum()) // (p.kv_heads - (len(removed) if p.whole_groups else 0))


def _cut_channels(block: nn.Module, p: Plan, removed: Tensor, W_down: Tensor) -> None:
    """Remove MLP channels ``removed``: their columns of the consumer (``W_down``: its new full-width weight)
    and their rows of the producers (gate/up)."""
    lay = p.layout
    keep = _keep(p.channels, removed)
    down = block.get_submodule(lay.mlp_out)
    _replace(block, lay.mlp_out, W_down[:, keep].to(get_weight(down).dtype), _bias(down))
    for name in lay.mlp_in:
        mod = block.get_submodule(name)
        _replace(block, name, get_weight(mod)[keep], None if _bias(mod) is None else _bias(mod)[keep])


def shrink_block(block: nn.Module, p: Plan, spec: ShrinkSpec, damp_frac: float, H_mlp: Tensor | None,
                 H_attn: Tensor | None) -> dict:
    """Remove this block's heads and channels in place (smaller modules); return what was removed."""
    lay, info = p.layout, {}
    if p.remove_per_group or p.whole_groups:
        W_o, W_q = get_weight(block.get_submodule(lay.o)), get_weight(block.get_submodule(lay.q))
        groups = _head_columns(p, W_o.device)
        group = p.heads // p.kv_heads
        if p.remove_per_group:
            n = p.remove_per_group * p.kv_heads

            def allowed(removed: Tensor) -> Tensor:
                return (removed.view(p.kv_heads, group).sum(1) < p.remove_per_group).repeat_interleave(group)
        else:
            n, allowed = p.whole_groups, None
        removed, W_new, err = _remove_groups(W_o, H_attn, groups, n, spec, damp_frac, [W_q], allowed)
        _cut_heads(block, p, removed, W_new)
        info.update(heads_removed=removed.tolist(), attn_rel_error=err)
    if p.keep_channels < p.channels:
        W_down = get_weight(block.get_submodule(lay.mlp_out))
        producers = [get_weight(block.get_submodule(n)) for n in lay.mlp_in]
        groups = torch.arange(p.channels, device=W_down.device).unsqueeze(1)
        n = p.channels - p.keep_channels
        removed, W_new, err = _remove_groups(W_down, H_mlp, groups, n, spec, damp_frac, producers,
                                             chunk=channel_chunk(n))
        _cut_channels(block, p, removed, W_new)
        info.update(channels_removed=removed.tolist(), mlp_rel_error=err)
    return info


def resize_block(block: nn.Module, p: Plan, info: dict) -> None:
    """Give a weightless (meta) block the shapes ``shrink_block`` left it with (``info``: its removed heads and
    channels), so the shrunk tensors of a resumed run load into it."""
    lay = p.layout
    if lay is None:
        return
    if info.get("heads_removed") is not None:
        _cut_heads(block, p, torch.tensor(info["heads_removed"], dtype=torch.long),
                   get_weight(block.get_submodule(lay.o)))
    if info.get("channels_removed") is not None:
        _cut_channels(block, p, torch.tensor(info["channels_removed"], dtype=torch.long),
                      get_weight(block.get_submodule(lay.mlp_out)))


class _Similarity:
    """Mean cosine similarity between a block's input and output hidden states over the calibration tokens."""

    def __init__(self, block: nn.Module):
        self.total, self.n = 0.0, 0
        self.handle = block.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, mod: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple | list) else out
        cos = torch.nn.functional.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
        self.total += float(cos.sum())
        self.n += cos.numel()

    def close(self) -> float:
        """The mean over every rank's tokens (torchrun), so all ranks drop the same blocks."""
        self.handle.remove()
        total, n = distributed.all_sum([self.total, float(self.n)])
        return total / max(n, 1)


def _same_on_every_rank(block: nn.Module) -> None:
    """torchrun: rank 0's shrunk block on all ranks (each rank chose the same groups from the same Hessians;
    this makes it so to the last bit whatever the device does)."""
    if distributed.active():
        for t in block.state_dict().values():
            distributed.broadcast_(t, 0)


def _update_config(model: nn.Module, p: Plan, kept_blocks: list[int]) -> None:
    config = model.config
    if p.experts is not None:
        setattr(config, p.experts[0], p.experts[2])
    if p.keep_channels < p.channels:
        setattr(config, p.layout.mlp_size, p.keep_channels)
    if p.remove_per_group or p.whole_groups:
        heads = p.heads - (p.remove_per_group * p.kv_heads or p.whole_groups)
        config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = p.kv_heads - p.whole_groups
        config.head_dim = p.head_dim  # kept explicit: hidden_size / heads no longer gives it
    n_layers = len(kept_blocks)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key) and getattr(config, key) is not None:
            setattr(config, key, n_layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) >= max(kept_blocks, default=0) + 1:
        config.layer_types = [layer_types[i] for i in kept_blocks]


def _drop_blocks(model: nn.Module, drop: list[int]) -> list[int]:
    path, blocks = find_blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(drop)]
    new = nn.ModuleList([blocks[i] for i in kept])
    for j, block in enumerate(new):  # the cache indexes layers by their position
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = j
    owner_name, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, leaf, new)
    return kept


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def shrink_model(model: nn.Module, tokenizer, run: RunSpec, spec: ShrinkSpec, progress: Progress = True,
                 on_block_done: Callable[[int, nn.Module, dict], None] | None = None,
                 done: dict[int, dict] | None = None, calibration: tuple[Tensor, dict] | None = None) -> dict:
    """Shrink ``model`` in place as ``spec`` says (calibration, Hessians, damping and reconstruction as in
    ``run``); return the run report.

    ``on_block_done(i, block, info)``: called with each shrunk block while its weights are loaded (a lazily
    loaded model's are dropped right after: that is where they get written). ``done``: blocks shrunk by an
    earlier, interrupted run (their report entries; a lazily loaded model reads their shrunk tensors): they
    are resized and only run, to feed the next block. ``calibration``: (windows, description) if already cut.
    """
    t0 = time.perf_counter()
    p = plan(model, spec)
    device = distributed.device() or resolve_device(run.device)
    before = count_params(model)
    windows, calib = calibration or calibration_set(tokenizer, model, run.calibration)
    done = done or {}
    _, all_blocks = find_blocks(model)
    for i, info in done.items():  # expert counts follow the tensors when they are read (lazy.BlockSource)
        resize_block(all_blocks[i], p, info)
    lay = p.layout
    per_block: list[dict] = []
    heads_go = bool(p.remove_per_group or p.whole_groups)
    channels_go = p.keep_channels < p.channels
    dropped: dict[str, dict] = {}

    rspec = run.reconstruction
    hessian_dtype, damp_frac = run.compress.hessian_dtype, run.compress.solve.sweep.damp_frac
    rebuilt: dict[str, dict] = {}

    def reconstructed(i: int, block: nn.Module, block_pass: BlockPass, targets: dict | None, info: dict) -> None:
        """--reconstruct: the shrunk block's remaining weights trained toward the dense block's outputs."""
        if targets is not None:
            info["reconstruct"] = reconstruct_trained(f"{path}.{i}", block, block_targets(block), block_pass,
                                                      rspec, targets, {}, masked=False)
            rebuilt[f"{path}.{i}"] = info["reconstruct"]

    def on_block(i: int, block: nn.Module, block_pass: BlockPass) -> None:
        if i in done:  # shrunk by the interrupted run: loaded shrunk, the engine's forward feeds the next block
            per_block.append(done[i])
            dropped.update(done[i].get("dropped_experts", {}))
            if rspec is not None:
                if "reconstruct" in done[i]:
                    rebuilt[f"{path}.{i}"] = done[i]["reconstruct"]
                if block_pass.dense_inputs is not None:
                    block_pass.dense_outputs = dense_outputs_of_original(i, block, block_pass, source)
            return
        targets = reconstruction_targets(block, block_targets(block), block_pass, rspec) if rspec else None
        if lay is not None and heads_go and channels_go and spec.method != "l1":
            return heads_then_mlp(i, block, block_pass, targets)
        watch = {}
        if channels_go and spec.method != "l1":
            watch["mlp"] = block.get_submodule(lay.mlp_out)
        if heads_go and spec.method != "l1":
            watch["attn"] = block.get_submodule(lay.o)
        similarity = _Similarity(block)
        collector = HessianCollector(watch, hessian_dtype=hessian_dtype)
        mine: dict[str, dict] = {}

        def run() -> None:
            with collector:
                block_pass()

        try:
            if p.experts is not None and experts.find_experts(block):  # scored in the same pass, then dropped
                mine = {f"{path}.{i}.{k}": v for k, v in experts.reap_drop(block, run, p.experts[2]).items()}
            else:
                run()
        finally:
            cos = similarity.close()
        info: dict = {"dropped_experts": mine} if mine else {}
        dropped.update(mine)
        if lay is not None:
            _, H, _ = shared_hessians(watch, collector)  # every rank's tokens; l1: none
            H = {k: H.get(k) for k in ("mlp", "attn")}
            info |= shrink_block(block, p, spec, damp_frac, H["mlp"], H["attn"])
            _same_on_every_rank(block)
        reconstructed(i, block, block_pass, targets, info)
        per_block.append({"block": i, "cosine": cos, **info})
        if on_block_done is not None:
            on_block_done(i, block, per_block[-1])

    def heads_then_mlp(i: int, block: nn.Module, block_pass: BlockPass, targets: dict | None) -> None:
        """Heads and channels both go: the heads first, chosen on o_proj's Hessian of the whole block, then
        the MLP channels on down_proj's Hessian with those heads already gone (one more pass over the block),
        so the MLP's update also absorbs what removing the heads changed in its input."""
        similarity = _Similarity(block)
        attn = HessianCollector({"attn": block.get_submodule(lay.o)}, hessian_dtype=hessian_dtype)
        try:
            with attn:
                block_pass()
        finally:
            cos = similarity.close()
        info = shrink_block(block, replace(p, keep_channels=p.channels), spec, damp_frac, None,
                            shared_hessians(attn.linears, attn)[1]["attn"])
        _same_on_every_rank(block)
        del attn
        mlp = HessianCollector({"mlp": block.get_submodule(lay.mlp_out)}, hessian_dtype=hessian_dtype)
        with mlp:
            block_pass()
        info |= shrink_block(block, replace(p, remove_per_group=0, whole_groups=0), spec, damp_frac,
                             shared_hessians(mlp.linears, mlp)[1]["mlp"], None)
        _same_on_every_rank(block)
        reconstructed(i, block, block_pass, targets, info)
        per_block.append({"block": i, "cosine": cos, **info})
        if on_block_done is not None:
            on_block_done(i, block, per_block[-1])

    path, _ = find_blocks(model)
    if distributed.active() and windows.shape[0] < distributed.world():
        raise UsageError(f"{windows.shape[0]} calibration windows cannot be shared by {distributed.world()} torchrun"
                         f" processes: raise --nsamples to at least {distributed.world()} or launch fewer")
    source = getattr(model, "block_source", None)
    stream = Stream(model, batched(distributed.shard(windows), run.calibration.batch_size), device, progress=progress,
                    carry_dense=rspec is not None and rspec.target == "dense")
    stream.run(on_block, desc="shrink")
    drop = sorted(sorted(range(len(per_block)), key=lambda i: per_block[i]["cosine"], reverse=True)
                  [: spec.drop_blocks])
    kept = _drop_blocks(model, drop) if drop else list(range(len(per_block)))
    _update_config(model, p, kept)
    after = count_params(model)
    log.info("shrink: %d -> %d parameters (%.1f%% fewer)", before, after, 100 * (1 - after / before))
    return {
        "shrink": asdict(spec),
        "recipe": copy.deepcopy(run.recipe),
        "calibration": calib,
        "sizes": {"mlp_channels": [p.channels, p.keep_channels] if lay is not None else None,
                  "heads": [p.heads, model.config.num_attention_heads] if heads_go else None,
                  "experts": list(p.experts[1:]) if p.experts else None,
                  "blocks": [len(per_block), len(kept)]},
        "dropped_experts": dropped,
        "dropped_blocks": drop,
        "blocks": per_block,
        "kept_blocks": kept,
        "params": {"before": before, "after": after},
        "reconstruction": reconstruction_summary(rspec, rebuilt, stream, len(per_block)) if rspec else None,
        "timings": {"shrink_s": round(time.perf_counter() - t0, 3)},
    }

