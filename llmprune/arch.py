"""Architectures as data: where a causal LM keeps its decoder blocks, and which modules are prunable.

Everything else (embeddings, rotary tables, masks, final norm, head) is left to the model's own forward:
the engine runs it with stand-ins in place of the blocks, so a family needs one table entry, not a driver.
"""

from __future__ import annotations

from torch import Tensor, nn

# model_type -> attribute path of the nn.ModuleList of decoder blocks
BLOCKS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "gptj": "transformer.h",
}


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder blocks: from the table, else the ModuleList of num_hidden_layers."""
    config = getattr(model, "config", None)
    path = BLOCKS.get(getattr(config, "model_type", ""), "")
    if path:
        try:
            return path, _get(model, path)
        except AttributeError:
            pass
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: add it to arch.BLOCKS")
    return max(candidates, key=lambda c: len(c[1]))


def is_prunable(module: nn.Module) -> bool:
    """nn.Linear, and transformers' Conv1D (GPT-2), which is a linear with a transposed weight."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in block.named_modules() if is_prunable(mod)}


def get_weight(module: nn.Module) -> Tensor:
    """The weight as (out_features, in_features), whatever the module's storage layout."""
    w = module.weight.data
    return w if isinstance(module, nn.Linear) else w.t()


def set_weight(module: nn.Module, W: Tensor) -> None:
    target = module.weight.data
    target.copy_(W if isinstance(module, nn.Linear) else W.t())
