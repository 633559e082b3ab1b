"""Architectures as data: where a causal LM keeps its decoder blocks, and which modules are prunable.

Everything else (embeddings, rotary tables, masks, final norm, head) is left to the model's own forward:
the engine runs it with stand-ins in place of the blocks, so a family needs one table entry, not a driver.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# parts of multimodal models that are not the language model: their ModuleLists are never its blocks
NOT_LANGUAGE = ("vision", "visual", "image", "audio", "speech", "encoder", "projector")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder blocks: from the table, else the ModuleList with the config's (or its
    text config's) layer count, the language model's in a multimodal model (never a vision tower's)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    path = BLOCKS.get(model_type, "")
    if path:
        try:
            return path, _get(model, path)
        except AttributeError:
            pass
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
        and not any(part in name.lower() for part in NOT_LANGUAGE)
    ]
    if not candidates:
        from llmprune.errors import UsageError

        raise UsageError(f"cannot find the decoder blocks of this {model_type or type(model).__name__} model"
                         f" ({type(model).__name__}): llmprune compresses causal language models; add its block"
                         " path to llmprune.arch.BLOCKS if it is one")
    language = [c for c in candidates if "language_model" in c[0] or "text_model" in c[0]]
    return max(language or candidates, key=lambda c: len(c[1]))


def causal_lm_class(config):
    """The transformers auto class that builds this config with its LM head: AutoModelForCausalLM, or for a
    multimodal config (Llava-style) AutoModelForImageTextToText, whose language model is what is compressed."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers import AutoModelForImageTextToText
    except ImportError:
        return AutoModelForCausalLM
    if type(config) not in AutoModelForCausalLM._model_mapping and type(config) in \
            AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def is_prunable(module: nn.Module) -> bool:
    """nn.Linear, and transformers' Conv1D (GPT-2), which is a linear with a transposed weight."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D registered in the block (routers and per-expert linears included)."""
    return {name: mod for name, mod in block.named_modules() if is_prunable(mod)}


# Leaf names of the linears that route tokens in a mixture-of-experts block: never pruned (a router's rows
# decide where every token goes; it is a tiny share of the weights). transformers 5 keeps routers as their
# own modules (MixtralTopKRouter, ...), older checkpoints and remote code as nn.Linear.
ROUTERS = ("gate", "router", "shared_expert_gate")

# Attribute names of fused expert parameters, (experts, rows, cols) or transposed (experts, cols, rows)
FUSED_EXPERTS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding its experts as 3-D parameters (transformers 5's MoE layout)."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3


def is_moe(block: nn.Module) -> bool:
    """Fused experts, or a ModuleList named ``experts`` (per-expert linears, older checkpoints)."""
    return any(is_fused_experts(m) or (n.rpartition(".")[2] == "experts" and isinstance(m, nn.ModuleList))
               for n, m in block.named_modules())


def find_routers(block: nn.Module) -> list[str]:
    """Names of the router linears of an MoE block (none in a dense block)."""
    if not is_moe(block):
        return []
    return [n for n in find_linears(block) if n.rpartition(".")[2] in ROUTERS]


def get_weight(module: nn.Module) -> Tensor:
    """The weight as (out_features, in_features), whatever the module's storage layout (a view: writes to it
    change the module)."""
    w = module.weight.data
    return w if isinstance(module, nn.Linear) else w.t()


def set_weight(module: nn.Module, W: Tensor) -> None:
    target = module.weight.data
    target.copy_(W if isinstance(module, nn.Linear) else W.t())


@dataclass(frozen=True)
class Layout:
    """Where a block keeps what structured pruning removes, by module names inside the block.

    MLP channels: rows of each ``mlp_in`` (gate/up, fc1) and columns of ``mlp_out`` (down, fc2), their count
    the config key ``mlp_size``. Heads (None where the family derives head_dim from the hidden size, so a head
    cannot go without changing it): rows of q (and of k/v with whole KV groups), columns of o.
    """

    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp_size: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    attn: str | None = None  # the attention module, whose num_key_value_groups follows the head count


_LLAMA = Layout(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", "self_attn.q_proj",
                "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn")

# model_type -> Layout, for ``llmprune shrink``
LAYOUTS: dict[str, Layout] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), _LLAMA),
    "opt": Layout(("fc1",), "fc2", "ffn_dim"),
    "gpt_neox": Layout(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "intermediate_size"),
    "gpt2": Layout(("mlp.c_fc",), "mlp.c_proj", "n_inner"),
}
