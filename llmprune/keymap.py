"""Checkpoint keys <-> a model's parameter names, by transformers' own loading rules.

A checkpoint does not always store a tensor under the name the module has: Mixtral and Qwen-MoE
checkpoints keep one tensor per expert (``block_sparse_moe.experts.3.w1.weight``) where transformers 5
builds fused 3-D parameters (``mlp.experts.gate_up_proj``); GPT-2 and BLOOM hub checkpoints lack the
base-model prefix. ``from_pretrained`` maps them with its conversion table and ``save_pretrained`` maps them
back; the lazy loader reads one block at a time, so it applies the same table here, one block's keys at a
time, and writes each compressed block back in the checkpoint's own layout.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy

from torch import Tensor, nn


def _rules(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) transformers applies to this model's checkpoint keys; empty when none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # an older transformers: keys are taken as they are
        return [], []
    try:
        rules = get_model_conversion_mapping(model)
    except Exception:  # a model class transformers cannot map (custom code): keys as they are
        return [], []
    return ([r for r in rules if isinstance(r, WeightRenaming)],
            [r for r in rules if isinstance(r, WeightConverter)])


class KeyMap:
    """Which checkpoint keys make each of ``model``'s parameters, and how (a rename, or a converter such as
    stacking per-expert tensors). Built from the checkpoint's key list alone; reads nothing."""

    def __init__(self, model: nn.Module, checkpoint_keys: Iterable[str]):
        self.model = model
        self.renamings, self.converters = _rules(model)
        names = {k: True for k in model.state_dict()}
        prefix = getattr(model, "base_model_prefix", None) or None
        self.sources: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self._by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        keys = list(checkpoint_keys)
        try:
            from transformers.core_model_loading import dot_natural_key, rename_source_key
        except ImportError:
            self.sources.update({k: [(k, None)] for k in keys if k in names})
            self.identity = True
            return
        for key in sorted(keys, key=dot_natural_key):
            target, pattern = rename_source_key(key, self.renamings, self.converters, prefix, names)
            if target not in names and key in names:
                target, pattern = key, None
            if target in names:
                self.sources[target].append((key, pattern))
        self.identity = all(len(src) == 1 and src[0] == (t, None) for t, src in self.sources.items())

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def checkpoint_keys(self, name: str) -> list[str]:
        return [k for k, _ in self.sources[name]]

    def read(self, get: Callable[[str], Tensor], names: Iterable[str]) -> dict[str, Tensor]:
        """Parameter name -> tensor for ``names``, each built from its checkpoint tensors (``get(key)``)."""
        out: dict[str, Tensor] = {}
        for name in names:
            if name in out:
                continue
            src = self.sources[name]
            if len(src) == 1 and src[0][1] is None:
                out[name] = get(src[0][0])
                continue
            conv = deepcopy(self._by_pattern[src[0][1]])
            for key, pattern in src:
                conv.add_tensor(name, key, pattern, (lambda k=key: get(k)))
            for target, value in conv.convert(name, model=self.model, config=self.model.config).items():
                out[target] = value[0] if isinstance(value, list) else value
        return out

    def to_checkpoint(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter name -> tensor, mapped back to the checkpoint's layout (as ``save_pretrained`` does)."""
        if self.identity:
            return tensors
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, dict(tensors))
